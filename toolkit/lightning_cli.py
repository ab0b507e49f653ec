"""LightningCLI for ``fit``/``validate``/``test``/``predict``: one run folder per run.

Kept apart from :mod:`toolkit.cli` because importing it imports Lightning (seconds), which the
rest of the command line must not pay for.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from toolkit.common.errors import UserError
from toolkit.common.paths import run_folder


class ToolkitCLI(LightningCLI):
    """Every run writes into its own ``<runs root>/<subcommand>/<config>/<UTC stamp>/`` folder.

    Args (besides LightningCLI's):
        run_command: the command line as typed; eval modules with a ``run_command`` attribute
            get it (results.json names it).
        extra_help: help of a ``--method`` option shown by ``test --help`` (toolkit.cli
            expands ``--method`` before this parser sees it).
    """

    def __init__(self, *args: Any, run_command: str = "", extra_help: str = "",
                 **kwargs: Any) -> None:
        self.run_command, self.extra_help = run_command, extra_help
        self.run_dir: Path | None = None
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # Argument errors raise (toolkit.cli prints one line and a hint) instead of printing
        # the whole usage, which lists every option (50+ lines) before the error.
        kwargs.setdefault("exit_on_error", False)
        kwargs.setdefault("prog", "python cli.py")
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        if self.extra_help:  # only while printing help: --method never reaches this parser
            parser.add_argument("--method", metavar="NAME", help=self.extra_help)

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        if sub is None:
            return
        cfg = self.config[sub]
        _share_data_dir(cfg)
        configs = cfg.get("config") or []
        name = Path(str(configs[-1])).stem if configs else "default"
        self.run_dir = run_folder(sub, name)
        folder = str(self.run_dir)
        cfg.trainer.default_root_dir = folder
        _use_stream_progress_bar(cfg.trainer)
        if cfg.trainer.get("logger") in (None, True):
            cfg.trainer.logger = {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": folder, "name": "", "version": ""}}

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except BaseException as err:
            self._mark_failed(err)
            # jsonargparse wraps a constructor's error in its own ValueError ("Does not validate
            # against any of the Union subtypes"); a user error inside goes out as itself.
            cause = _user_error_in(err)
            if cause is not None:
                raise cause from None
            raise
        if hasattr(self.model, "run_command"):
            self.model.run_command = self.run_command

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException as err:
            self._mark_failed(err)
            raise

    def _mark_failed(self, err: BaseException) -> None:
        """A failed run's folder goes if it holds only what every run writes first (its config
        and TensorBoard events); otherwise (checkpoints, partial results) it stays, with
        ``FAILED`` naming the error, so runs/ never shows a failed run as a finished one."""
        folder = self.run_dir
        if folder is None or not folder.is_dir():
            return
        files = [p for p in folder.rglob("*") if p.is_file()]
        if all(p.name == "config.yaml" or p.name.startswith("events.out.tfevents")
               for p in files):
            shutil.rmtree(folder, ignore_errors=True)
        else:
            (folder / "FAILED").write_text(f"{type(err).__name__}: {err}\n")


def _user_error_in(err: BaseException) -> UserError | None:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _use_stream_progress_bar(trainer: Any) -> None:
    """Lightning's bar, but one that knows the length of streamed data (``3/3``, not ``3/--``),
    unless the bar is off or the config chose its own."""
    from jsonargparse import Namespace

    if trainer.get("enable_progress_bar") is False:
        return
    callbacks = list(trainer.get("callbacks") or [])
    if any("ProgressBar" in str(c.get("class_path", "")) for c in callbacks
           if isinstance(c, Namespace)):
        return
    trainer.callbacks = [*callbacks, Namespace(
        class_path="toolkit.common.progress.StreamProgressBar", init_args=Namespace())]


def _share_data_dir(cfg: Any) -> None:
    """One option sets the records folder for a model that reads records itself (the cascade's
    replay evaluation) and for its data module: whichever of ``--data.data_dir`` and
    ``--model.data_dir`` moved from its class default is copied to the other (Lightning refuses
    to log two different values under one hparam name); both moved and different is an error.
    (``link_arguments`` cannot do this: it silently overrides a ``--model.data_dir``.)"""
    import importlib
    import inspect

    from jsonargparse import Namespace

    def default_of(class_path: str) -> Any:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return inspect.signature(cls).parameters["data_dir"].default

    model, data = cfg.get("model"), cfg.get("data")
    if not (isinstance(model, Namespace) and isinstance(data, Namespace)):
        return
    values = {k: (v.get("init_args") or Namespace()).get("data_dir")
              for k, v in (("model", model), ("data", data))}
    if None in values.values() or values["model"] == values["data"]:
        return
    moved = {k for k, v in (("model", model), ("data", data))
             if values[k] != default_of(v.class_path)}
    if moved == {"model"}:
        data.init_args.data_dir = values["model"]
    elif moved == {"data"}:
        model.init_args.data_dir = values["data"]
    else:
        raise UserError(f"--model.data_dir {values['model']} and --data.data_dir "
                        f"{values['data']} differ; give one (the other follows)")


def make_cli(args: list[str], run_command: str, extra_help: str = "") -> ToolkitCLI:
    """Parse ``args`` and run the Lightning subcommand they name."""
    cli = ToolkitCLI(
        LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        args=args, save_config_kwargs={"overwrite": True}, seed_everything_default=0,
        run_command=run_command, extra_help=extra_help)
    if getattr(cli, "trainer", None) is not None:
        print(f"run directory: {cli.trainer.log_dir}")
    return cli

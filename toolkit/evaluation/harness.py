"""The end of every ``test`` run, written once: gather rows, write results, plot, log, print.

Each system's evaluation module (cascade replay, q*, diffusion decoding) subclasses
:class:`EvaluationModule` and supplies only what differs: the per-example rows (appended to
``self.rows`` in ``test_step``), a :class:`RunReport` built from the gathered rows, and its
figures. The shared steps keep the contract of SPEC §D2: every rank's rows are gathered and
sorted by id on rank 0, which alone computes metrics and writes ``results.json``,
``examples.jsonl`` and ``plots/*.png`` into the run directory; every figure also goes to
TensorBoard as ``test/<method>/<name>`` and every scalar metric as ``test/<method>/<metric>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule

from toolkit.evaluation.results import RunReport, collect_rows, write_results


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (runs have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class EvaluationModule(LightningModule):
    """Base of the evaluation modules behind ``python cli.py test --method NAME``.

    Subclasses append one dict per example (with an ``id``) to ``self.rows`` and implement
    :meth:`build_report` and, optionally, :meth:`figures`.
    """

    #: The command line as the user typed it; the CLI sets it before the run.
    run_command: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []

    def build_report(self, rows: list[dict[str, Any]]) -> RunReport:
        """Metrics and metadata of the run from every rank's rows (sorted by id, rank 0)."""
        raise NotImplementedError

    def figures(self, rows: list[dict[str, Any]], report: RunReport) -> dict[str, Any]:
        """Matplotlib figures by name (saved as ``plots/<name>.png``); none by default."""
        return {}

    def on_test_epoch_end(self) -> None:
        rows, run_dir = collect_rows(self.rows, self.trainer)  # collective: every rank calls
        self.rows = []
        if rows is None:
            return
        report = self.build_report(rows)
        report.command = self.run_command
        path = write_results(run_dir, report)
        self._save_figures(run_dir, report.method, self.figures(rows, report))
        for name, value in report.metrics.items():
            if isinstance(value, dict) and isinstance(value.get("value"), (int, float)):
                self.log(f"test/{report.method}/{name}", float(value["value"]),
                         rank_zero_only=True)
        self._results_path = path

    def on_test_end(self) -> None:
        # Printed here, not at epoch end: the progress bar (a callback, whose on_test_end runs
        # before the module's) has closed its line by now.
        path = getattr(self, "_results_path", None)
        if path is not None:
            print(f"results: {path}")

    def _save_figures(self, run_dir: Path, method: str, figures: dict[str, Any]) -> None:
        if not figures:
            return
        plt = pyplot()
        (run_dir / "plots").mkdir(parents=True, exist_ok=True)
        for name, fig in figures.items():
            fig.savefig(run_dir / "plots" / f"{name}.png", dpi=120)
            for logger in self.trainer.loggers:
                if hasattr(logger.experiment, "add_figure"):
                    logger.experiment.add_figure(f"test/{method}/{name}", fig)
            plt.close(fig)

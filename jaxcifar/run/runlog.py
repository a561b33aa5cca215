"""Run logs: log.txt, metrics.csv and metrics.jsonl in the workdir, the console lines and the progress bar."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from jaxcifar.data import archive
from jaxcifar.run import files, workdir as workdir_lib
from jaxcifar.nn import metrics
from jaxcifar.errors import short_path


class RunLog:
    """log.txt (every console line), metrics.csv and metrics.jsonl (a row per epoch) of one workdir."""

    CSV_FIELDS = ("epoch", "step", "learning_rate", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                  "test_average_row_correct", "test_average_rowucol_correct", "epoch_time_s", "train_images_per_s",
                  "eval_time_s")
    PER_SEED_FIELDS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")

    def __init__(self, workdir: Path, writer: bool = True):
        """`writer=False` (every process but 0 of a multi-process run): prints and writes nothing."""
        self.workdir = workdir
        self.writer = writer
        self.csv_fields = self.CSV_FIELDS  # with several seeds, `rewrite` adds theirs
        self._text = open(workdir / "log.txt", "a", buffering=1) if writer else None

    def print(self, msg: str = "") -> None:
        if self.writer:
            print(msg, flush=True)
            self._append(msg)

    def write(self, msg: str) -> None:
        """To log.txt only."""
        if self.writer:
            self._append(msg)

    def _append(self, msg: str) -> None:
        if self._text.closed:  # log.txt failed once (a full disk): the console still gets every line
            return
        try:
            self._text.write(msg + "\n")
        except OSError as e:
            self._close_text()
            raise files.write_failed(e, self.workdir / "log.txt") from None

    def _close_text(self) -> None:
        try:
            self._text.close()
        except OSError:  # the close flushes what could not be written (a full disk), which is reported already
            pass

    def epoch(self, record: dict) -> None:
        if not self.writer:
            return
        for name, line in (("metrics.csv", self._csv_row(record)), ("metrics.jsonl", json.dumps(record) + "\n")):
            try:
                with open(self.workdir / name, "a") as f:  # rewrite() wrote the CSV's header at the start
                    f.write(line)
            except OSError as e:
                raise files.write_failed(e, self.workdir / name) from None

    def rewrite(self, history: list[dict], seeds: tuple[int, ...] = ()) -> None:
        """Makes metrics.csv/jsonl hold exactly `history` (atomic replace), keeping what it drops aside; the CSV's
        columns from now on are those of a run of `seeds`: with several, the means lead, then the std of test
        accuracy and each seed's own numbers."""
        self.csv_fields = self.CSV_FIELDS + (
            ("test_accuracy_std", *(f"{k}_seed{s}" for s in seeds for k in self.PER_SEED_FIELDS))
            if len(seeds) > 1 else ())
        if not self.writer:
            return
        jsonl = self.workdir / "metrics.jsonl"
        if jsonl.exists():
            old = jsonl.read_text().splitlines()
            if len(old) > len(history):  # epochs logged after the last save: kept, not lost
                with open(self.workdir / "metrics.discarded.jsonl", "a") as f:
                    f.write("".join(line + "\n" for line in old[len(history):]))
        for name, text in (("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history)),
                           ("metrics.csv", ",".join(self.csv_fields) + "\n" + "".join(map(self._csv_row, history)))):
            files.atomic_write(self.workdir / name, text.encode())

    def _csv_row(self, record: dict) -> str:
        return ",".join(_csv_value(_csv_field(record, k)) for k in self.csv_fields) + "\n"

    def close(self) -> None:
        if self._text is not None and not self._text.closed:
            self._close_text()


# The fields of an epoch record that measure time, and so differ between two runs of the same computation.
TIMED_FIELDS = ("epoch_time_s", "train_images_per_s", "eval_time_s", "startup_s", "bookkeeping_s")
# Where and by what code the epoch trained (machine.run_context): another machine may compute the same.
CONTEXT_FIELDS = ("machine", "commit")


def untimed_records(workdir: Path) -> list[dict]:
    """The epoch records of workdir/metrics.jsonl without TIMED_FIELDS and CONTEXT_FIELDS: equal for runs that
    computed the same."""
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    left_out = TIMED_FIELDS + CONTEXT_FIELDS
    return [{k: v for k, v in json.loads(line).items() if k not in left_out} for line in lines if line.strip()]


def _csv_value(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _csv_field(record: dict, name: str):
    if "_seed" in name and name not in record:  # e.g. test_accuracy_seed3
        field, seed = name.rsplit("_seed", 1)
        return record["per_seed"][field][record["seeds"].index(int(seed))]
    return record[name]


def epoch_record(*, epoch: int, step: int, lr: float, seeds: list[int], train_loss, train_conf, test_loss, test_conf,
                 train_time: float, eval_time: float, images: int, context: dict) -> dict:
    """One epoch's log entry: means over the replicas (the only values when there is one) and each seed's own.

    The confusion matrix is the replicas' sum, so its accuracy is the mean accuracy. `train_time` is the seconds
    that trained `images` images; `context`, machine.run_context().
    """
    train_s = [metrics.summarize(c) for c in train_conf]
    test_s = [metrics.summarize(c) for c in test_conf]
    per_seed = {"train_loss": [float(v) for v in train_loss], "train_accuracy": [s["accuracy"] for s in train_s],
                "test_loss": [float(v) for v in test_loss], "test_accuracy": [s["accuracy"] for s in test_s]}

    def mean(values):
        return float(np.mean(values))

    return {
        "epoch": epoch, "step": step, "learning_rate": lr, "train_loss": mean(per_seed["train_loss"]),
        "train_accuracy": mean(per_seed["train_accuracy"]), "test_loss": mean(per_seed["test_loss"]),
        "test_accuracy": mean(per_seed["test_accuracy"]),
        "test_average_row_correct": mean([s["average_row_correct"] for s in test_s]),
        "test_average_rowucol_correct": mean([s["average_rowucol_correct"] for s in test_s]),
        "epoch_time_s": train_time + eval_time, "train_images_per_s": images * len(seeds) / train_time,
        "eval_time_s": eval_time, "test_confusion": np.sum(test_conf, axis=0).tolist(),
        "test_accuracy_std": float(np.std(per_seed["test_accuracy"], ddof=1)) if len(seeds) > 1 else 0.0,
        "seeds": list(seeds), "per_seed": per_seed, **{k: context[k] for k in CONTEXT_FIELDS},
    }


def progress_bar(epoch: int, total: int, start: int):
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc=f"epoch {epoch}", unit="step", leave=False, dynamic_ncols=True,
               file=sys.stderr)

    def update(done: int, loss: float):
        bar.update(done - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}")

    return bar, update


def log_epoch(log: RunLog, r: dict) -> None:
    """The seed's per-epoch console lines (means over the seeds), then each seed's when there are several."""
    seeds = r["seeds"]
    over = f" (mean of {len(seeds)} seeds)" if len(seeds) > 1 else ""
    log.print(f"Train loss: {r['train_loss']:.4f}  Train accuracy: {r['train_accuracy']:.2f} %{over}  "
              f"time: {r['epoch_time_s'] - r['eval_time_s']:.1f} s ({r['train_images_per_s']:.0f} images/s)")
    spread = f" ± {r['test_accuracy_std']:.2f}" if len(seeds) > 1 else ""
    log.print(f"Test accuracy: {r['test_accuracy']:.2f}{spread} %{over}  (loss {r['test_loss']:.4f}, "
              f"{r['eval_time_s']:.1f} s)")
    if len(seeds) > 1:
        p = r["per_seed"]
        for i, s in enumerate(seeds):
            log.print(f"  seed {s}: train loss {p['train_loss'][i]:.4f}, train {p['train_accuracy'][i]:.2f} %, "
                      f"test {p['test_accuracy'][i]:.2f} % (loss {p['test_loss'][i]:.4f})")
        log.print(f"test confusion summed over the {len(seeds)} seeds:")
    log.print(metrics.format_confusion(np.asarray(r["test_confusion"]), archive.CLASS_NAMES))


def scalar_summary(r: dict) -> dict:
    """TensorBoard scalars: the means under their usual tags; with several seeds, the std and seed<k>/ tags."""
    out = {k: r[k] for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate",
                             "train_images_per_s")}
    if len(r["seeds"]) > 1:
        out["test_accuracy_std"] = r["test_accuracy_std"]
        for field, values in r["per_seed"].items():
            out.update({f"seed{s}/{field}": v for s, v in zip(r["seeds"], values)})
    return out


def duration(seconds: float) -> str:
    """'42 s', '12.5 min', '6 h 05 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min"


def run_eta(history: list[dict], epochs_left: int, compiled_in: int | None = None) -> str:
    """'; run ETA 5 h 40 min (at 14:32)' from the last epochs' times (empty before any epoch has a time).

    `compiled_in`: the index in `history` of the epoch that paid this process's compilation, left out once a later
    epoch has a time (on an H200 it took 59 s against 6.7 s for the next: the ETA read 38 min for a 4-min run)."""
    if compiled_in is not None and len(history) > compiled_in + 1:
        history = history[:compiled_in] + history[compiled_in + 1:]
    recent = [r["epoch_time_s"] for r in history[-3:]]
    if not recent or epochs_left <= 0:
        return ""
    left = epochs_left * sum(recent) / len(recent)
    at = time.strftime("%H:%M", time.localtime(time.time() + left))
    return f"; {epochs_left} epoch{'s' if epochs_left > 1 else ''} to go, run ETA {duration(left)} (at {at})"


@dataclasses.dataclass
class RunSummary:
    """What a training run's last line says, filled in as the run goes so that it can be said however it ends."""

    workdir: Path
    num_epochs: int
    started: float = dataclasses.field(default_factory=time.monotonic)
    history: list = dataclasses.field(default_factory=list)
    epochs_before: int = 0  # finished epochs the run resumed with
    writer: bool = True  # of several processes, only process 0 says it
    training_started: bool = False  # the loop over epochs began (before it, a failed start leaves nothing behind)

    def follow(self, history: list) -> None:
        """Reads the run's history list from now on (the epochs it resumed with count as done before)."""
        self.history, self.epochs_before = history, len(history)

    def line(self, outcome: str) -> str:
        """'jaxcifar: finished: 40 of 40 epochs, final test accuracy ..., best ...; 6 h 05 min; report ...; ...'.

        A run that did not finish says what its workdir has saved (the epochs up to its newest complete checkpoint),
        and its accuracy is the last one, not a final one."""
        h, finished = self.history, outcome == "finished"
        done = f"{len(h)} of {self.num_epochs} epochs" if self.num_epochs else "nothing trained"
        if len(h) > self.epochs_before and self.epochs_before:
            done += f" ({len(h) - self.epochs_before} this time)"
        if h:
            best = max(h, key=lambda r: r["test_accuracy"])
            done += (f", {'final' if finished else 'last'} test accuracy {h[-1]['test_accuracy']:.2f} % (epoch "
                     f"{h[-1]['epoch']}), best {best['test_accuracy']:.2f} % (epoch {best['epoch']})")
        if not finished and self.writer:
            done += f"; saved: {saved_in(self.workdir)}"
        where = [f"{name} {short_path(path)}" for name, path in (("report", self.workdir / "report.html"),
                                                                 ("checkpoints", self.workdir / "checkpoints"))
                 if _exists(path)]
        return f"jaxcifar: {outcome}: {done}; {duration(time.monotonic() - self.started)}" + "".join(
            f"; {w}" for w in where)


def saved_in(workdir: Path) -> str:
    """What a workdir's newest complete checkpoint holds, in words: 'epoch 3 (step 18)', 'step 23, during epoch 4',
    or 'nothing'. Read from the folder names and metrics.jsonl alone (no checkpoint is opened)."""
    steps = workdir_lib.complete_steps(workdir / "checkpoints")
    if not steps:
        return "nothing"
    try:
        lines = (workdir / "metrics.jsonl").read_text().splitlines() if (workdir / "metrics.jsonl").is_file() else []
    except (OSError, ValueError):
        lines = []
    step = steps[-1]
    epochs = [r for r in map(_record, lines) if r is not None and r.get("step", step + 1) <= step]
    if epochs and epochs[-1]["step"] == step:
        return f"epoch {epochs[-1]['epoch']} (step {step})"
    return f"step {step}, during epoch {len(epochs) + 1}"


def _record(line: str) -> dict | None:
    """A metrics.jsonl line as a record; None for a line a full disk cut short (the summary must still be said)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def keep_traceback(workdir: Path | None) -> str:
    """Appends the exception being handled, with its traceback, to workdir/log.txt (or, failing that, a file of
    its own in the temporary folder); returns where it went, for the one-line error."""
    import tempfile
    import traceback

    text = traceback.format_exc()
    try:
        if workdir is None:
            raise OSError("no workdir")
        with open(Path(workdir) / "log.txt", "a") as f:
            f.write(text)
        return f"a bug: please report it with {Path(workdir) / 'log.txt'}, which holds the traceback"
    except OSError:
        with tempfile.NamedTemporaryFile("w", prefix="jaxcifar-traceback-", suffix=".txt", delete=False) as f:
            f.write(text)
        return f"a bug: please report it with {f.name}, which holds the traceback"

"""DVC stage `monitor`: drift of the images in data/incoming/ against the model's reference.

With no image files there (the repository ships only its README), it records that in the report
and a note in runs/monitor/, without loading torch, the model or the reference: about a second.
A drift verdict does not fail the stage (`dvc repro` goes on); `reprotune monitor --fail-on-drift`
is the command for cron and CI.
"""

from pathlib import Path

from reprotune.config import load_params
from reprotune.entrypoint import ParamsFile, run_stage
from reprotune.files import atomic_dir, write_json
from reprotune.images import SUFFIXES

INCOMING = Path("data/incoming")
MODEL, REFERENCE = Path("models/model.pt"), Path("models/reference.pt")
METRICS, RUNS = Path("metrics/monitor.json"), Path("runs/monitor")


def main(params: ParamsFile = Path("params.yaml")) -> None:
    cfg = load_params(params)
    if not any(p.is_file() and p.suffix.lower() in SUFFIXES for p in INCOMING.rglob("*")):
        write_json(METRICS, {"drift": False, "verdict": "no incoming images", "images": 0})
        with atomic_dir(RUNS) as tmp:  # replaces an earlier check's run: it described other images
            (tmp / "README.txt").write_text(f"No images in {INCOMING}/: nothing was checked.\n")
        print(f"monitor: no images in {INCOMING}/")
        return
    from reprotune.evaluation.drift import check  # the model and the statistics only when there is something to check

    report = check(INCOMING, MODEL, REFERENCE, RUNS, cfg.monitor.alpha, cfg.monitor.permutations)
    write_json(METRICS, report)


if __name__ == "__main__":
    run_stage(main)

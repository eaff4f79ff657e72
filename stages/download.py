"""DVC stage `download`: fetch the CIFAR-10 archive (md5-verified) or generate the synthetic one."""

from pathlib import Path

from reprotune import data, tb
from reprotune.config import load_params
from reprotune.io import write_json
from reprotune.stage import ParamsFile, run_stage

ARCHIVE = Path("data/raw/cifar-10-python.tar.gz")


def main(params: ParamsFile = Path("params.yaml")) -> None:
    cfg = load_params(params)
    with tb.stage_writer("runs/download") as writer:
        info = data.download(cfg.data, ARCHIVE, writer)
    write_json("metrics/download.json", info)
    print(f"{ARCHIVE}: {info['bytes']:,} bytes, md5 {info['md5']}")


if __name__ == "__main__":
    run_stage(main)

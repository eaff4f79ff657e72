"""DVC stage `download`: fetch the dataset's archive (md5-verified) or generate the synthetic one."""

from pathlib import Path

from reprotune.config import load_params
from reprotune.data.download import download
from reprotune.entrypoint import ParamsFile, run_stage
from reprotune.files import write_json
from reprotune.tracking import tensorboard


def main(params: ParamsFile = Path("params.yaml")) -> None:
    cfg = load_params(params)
    with tensorboard.stage_writer("runs/download") as writer:
        info = download(cfg.data, writer)
    write_json("metrics/download.json", info)
    if info["url"] is None:
        print(f"{cfg.data.path}: a local image tree, read by preprocess; nothing to fetch")
    else:
        print(f"{cfg.data.archive}: {info['bytes']:,} bytes, md5 {info['md5']}")


if __name__ == "__main__":
    run_stage(main)

"""The import path Serve config files written before the package split name (`reprotune.serve:build`),
kept so that they still deploy; new ones name `reprotune.inference.server:build` (deploy/*.yaml)."""

from reprotune.inference.server import build

__all__ = ["build"]

"""Run a Python script and record its peak resident memory: python bench/peak.py OUT.json SCRIPT [ARGS]."""

import atexit
import json
import runpy
import sys
from pathlib import Path

from reprotune.training.loop import peak_memory_mib

out, script, *rest = sys.argv[1:]
# VmHWM is this process's resident high-water mark (ru_maxrss would carry the parent's over exec);
# written however the script exits.
atexit.register(lambda: Path(out).write_text(json.dumps({"peak_mib": peak_memory_mib()})))
sys.argv = [script, *rest]
runpy.run_path(script, run_name="__main__")

"""`reprotune sweep`: DVC experiments run as Ray tasks across machines, each published with `dvc exp
push` and pulled back, so they look exactly as if they had run here.

  plan.py    which experiments a sweep holds (a `-S` grid, DVC's queue), their names, and which of
             them already exist on the git remote with the same params and code
  worker.py  one experiment on one node: a clone at the base commit, `dvc exp run --pull`, `dvc exp
             push`; its processes in a group of their own that dies with the task
  driver.py  the Ray side: tasks with their resources and retries, live progress, Ctrl-C, the pull
"""

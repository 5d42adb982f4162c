"""Alias of `python -m dsset.main` kept for older commands: an evaluation config (linear_eval.py,
knn_eval.py, finetune.py, segment.py) names its method, and dsset.main runs it like any other."""

from absl import app

from dsset import main as dsset_main

if __name__ == '__main__':
  dsset_main.define_flags()
  app.run(dsset_main.main, flags_parser=dsset_main.parse_flags)

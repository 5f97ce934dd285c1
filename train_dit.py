#!/usr/bin/env python
"""Launcher of :mod:`hcvision.train_dit`, kept for the layout users know (``python train_dit.py ...``).

The trainer lives in the package, so an installed hcvision runs it from any directory: ``python -m hcvision.train_dit``
or the console script ``hcv-train-dit``. ``--help`` lists every key.
"""
import sys

from hcvision.train_dit import main

if __name__ == "__main__":
    sys.exit(main())

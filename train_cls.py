#!/usr/bin/env python
"""Launcher of :mod:`hcvision.train_cls`, kept for the layout users know (``python train_cls.py ...``).

The trainer lives in the package, so an installed hcvision runs it from any directory: ``python -m hcvision.train_cls``
or the console script ``hcv-train-cls``. ``--help`` lists every key.
"""
import sys

from hcvision.train_cls import main

if __name__ == "__main__":
    sys.exit(main())

"""Experiments and benchmarks, apart from the library: not ``res_backbone`` or ``heads`` API.

The tools import these modules as ``studies.*`` (``tools/`` is first on ``sys.path`` when a tool runs;
pytest's ``pythonpath`` adds it for the tests). Dependencies run one way: ``res_backbone`` <- ``heads``
<- ``tools`` (these modules included); nothing in the library imports them.

* :mod:`studies.timing`: interleaved timing, per-call results, operator counts, environment.
* :mod:`studies.bench_backbone`: our ResNets against torchvision's and timm's (``bench.py backbone``).
* :mod:`studies.bench_detector`: our Faster R-CNN against torchvision's (``bench.py detector``).
* :mod:`studies.analysis`: plain vs residual, degradation and gradient flow (``degradation.py``, ``grad_flow.py``).
* :mod:`studies.transfer_study`: pre-training vs from scratch at equal time (``transfer_study.py``).
* :mod:`studies.timm_suite`: timm's own model tests over the ``rb_*`` models (``run_timm_suite.py``).
"""

"""The method scripts, in the README's order: the one list the tests and the benchmarks use."""

SCRIPTS = [
    "supervised.py",
    "pi_model.py",
    "mean_teacher.py",
    "temporal_ensembling.py",
    "uda.py",
    "flexmatch.py",
    "dst.py",
    "mpl.py",
    "maxl.py",
]

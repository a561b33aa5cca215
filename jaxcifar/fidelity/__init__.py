"""The fidelity tooling: jaxcifar's numerics measured on real data against an independent PyTorch port.

    torch_port   the port, written from the original's .lua files (needs the `torch` extra)
    runs         a recipe's run on either side, epoch by epoch, resumable (the JAX side through resume.py, as
                 `python -m jaxcifar.train` resumes)
    comparison   the statistics: G, means and standard errors, the criterion
    tables       the markdown tables of the runs' JSON files
    command      `python scripts/fidelity.py`'s command line
    bn_shift     BatchNorm's train/eval shift per layer (`scripts/bn_shift.py`)
    replica_drift  replica k of a multi-seed program against seed k's single run (`scripts/replica_drift.py`)

Nothing here imports torch until a PyTorch run is asked for.
"""

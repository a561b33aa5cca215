"""Replica k of a `--config.seeds` program against the single run of seed k, step by step:
`python scripts/replica_drift.py --help`. The measurement is jaxcifar/fidelity/replica_drift.py."""

if __name__ == "__main__":  # before the heavy imports: Ctrl-C while they load is one line too
    from jaxcifar import cli

    cli.interrupt_exits_quietly()
    from jaxcifar.fidelity import replica_drift

    cli.run_command(replica_drift.main)

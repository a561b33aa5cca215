"""BatchNorm's train/eval shift per layer in finished fidelity runs: `python scripts/bn_shift.py --help`.
The measurement is jaxcifar/fidelity/bn_shift.py."""

if __name__ == "__main__":  # before the heavy imports: Ctrl-C while they load is one line too
    from jaxcifar import cli

    cli.interrupt_exits_quietly()
    from jaxcifar.fidelity import bn_shift

    cli.run_command(bn_shift.main)

"""Fidelity runs of a recipe in JAX or in the PyTorch port, and their tables: `python scripts/fidelity.py --help`.
The tooling is the package jaxcifar.fidelity (this is its command line, jaxcifar/fidelity/command.py)."""

if __name__ == "__main__":  # before the heavy imports: Ctrl-C while they load is one line too
    from jaxcifar import cli

    cli.interrupt_exits_quietly()
    from jaxcifar.fidelity import command

    cli.run_command(command.main)

"""`python -m biofp_core` is the `biofp` command."""

from biofp_core.cli import main

main()

"""``python -m equimodal`` runs the command line."""

from equimodal.cli import main

main()

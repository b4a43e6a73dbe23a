"""``python -m equimodal`` runs the command line."""

from equimodal.apps.cli import main

main()

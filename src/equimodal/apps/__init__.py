"""Applications on top of the library: the ``equimodal`` command line, the benchmark
harness, reports and plots, the diagnosis report, and the prepare command."""

"""The tools: the command line, the demo and the run timeline."""

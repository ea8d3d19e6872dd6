"""`parallax plan`: prove on paper, before a job is submitted, that a layout fits and how fast it runs.

Pure arithmetic (memory.py, throughput.py) over the parameter counts of the real model, built for
one rank on the meta device (count.py); pipeline.py says what each pipeline stage holds and keeps in
flight, and what its schedule costs; layout.py puts them together, cli.py prints them.
"""

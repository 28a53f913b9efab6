"""`search-map`: a genetic search for which teacher layers a shallow DQ student copies (issue 14).

Jiao et al. (2020, TinyBERT's layer-mapping search) evolve the student-to-teacher layer mapping with a genetic
algorithm scored by a cheap proxy fit; here the genome is the pair (encoder map, decoder map) of an
encoder-decoder student, and the proxy is a short DQ fit under the student's quantization.

One module per concept: `genome` (maps and their validity), `operators` (selection, crossover, mutation,
elitism), `population` (hand-made seeds, random fill), `settings` (the validated search settings and the
default budget), `fitness` (the short DQ fit), `run_config` (the task's config file), `state` (resumable
state), `search` (the generational loop), `outputs` (search.csv, best.json, fitness.png) and `cli`.
"""

"""The zero-shot task suite by name: every task lm.zero_shot can run, and the short set sized for CPU.

Its own module so that the run sizes (lm.sizes) can name tasks without importing the harness
(lm.zero_shot imports the command-line layer, which reads the sizes).
"""

ALL_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# The CPU default: on CPU each document costs one forward pass per choice, and these have short
# documents and few choices (hellaswag and the multiple-choice ones cost 2-4x as much per document).
SHORT_TASKS = ("boolq", "rte", "winogrande", "arc_easy")

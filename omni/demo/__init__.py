"""The generated demo corpora and their task scorer: used by configs/demo*.py, the CLI and the tools, never by
the trainer. Importing this package registers 'demo', 'demo-speech' and 'demo-draw' as generated datasets, so
`data.dataset=demo` builds the corpus on first use."""

from omni.data.dataset import register_generated
from omni.demo import corpus

for _name in corpus.NAMES:
    register_generated(_name, corpus.build)

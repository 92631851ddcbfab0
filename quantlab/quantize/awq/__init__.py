"""AWQ W4A16 engines: the engine-neutral job and parameters (engine.py), quantlab's own streaming engine
(native.py, with search.py, mappings.py and pack.py), gptqmodel's (gptqmodel_engine.py), and the shard reader
and writer they share (shards.py). The method (quantlab/methods/awq.py) writes config.json around them.

A new engine is one class with `name`, `check(params, config)` and `quantize(job)`, added to ENGINES and to the
`engine` literal of AwqConfig; recipes, measurement and builds do not change.
"""

from quantlab.quantize.awq.gptqmodel_engine import GptqmodelEngine
from quantlab.quantize.awq.native import QuantlabEngine

ENGINES = {engine.name: engine for engine in (QuantlabEngine(), GptqmodelEngine())}

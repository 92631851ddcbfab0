"""AWQ W4A16: engine-neutral interface (engine.py), engines, and the shared checkpoint writer (handler.py).

A new engine is one class with `name`, `check` and `quantize`, added to ENGINES and to the
`engine` literal of AwqConfig; recipes, measurement and builds do not change.
"""

from quantlab.quantize.awq.gptqmodel_engine import GptqmodelEngine
from quantlab.quantize.awq.native import QuantlabEngine

ENGINES = {engine.name: engine for engine in (QuantlabEngine(), GptqmodelEngine())}

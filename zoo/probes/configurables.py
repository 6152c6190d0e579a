"""gin wiring for the probes (through zoo.gin_config, the zoo's one gin module).

A gin file that says `import zoo.probes.configurables` can build the theory's explicit constructions:

    build_model.model = @explicit_construction
    explicit_construction.model = @CausalLM
    explicit_construction.uniform_routing = True
    explicit_construction.gain = 0.5
"""

from zoo import gin_config
from zoo.probes.construction import explicit_construction

gin_config.configurable(explicit_construction)

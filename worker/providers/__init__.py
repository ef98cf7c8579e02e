"""Provider-native payloads: message shapes, validation, images, tools, conversion, grouping.

One module per provider (`openai`, `anthropic`); shared rules live beside them. Nothing here
imports the engine, so the engine can depend on these modules and not the other way round.
"""

"""Provider-native payloads: message shapes, validation, images, tools, conversion, grouping.

    rules.py        the constants (config/models.yaml: image_rules, image_families,
                    image_limits, tool_rules, image_url_policy) as a validated PayloadRules
    images.py       image size from header bytes; base64 / data URLs; tile, patch, Claude rules
    image_costs.py  tokens of one native image part, with its inexact reasons
    tools.py        OpenAI tool definitions, tool_calls and tool messages
    base.py         strict base model, error paths, the per-request image checker
    openai.py       Chat Completions shapes and ordering rules
    anthropic.py    Messages shapes and ordering rules
    convert.py      OpenAI history <-> Anthropic history
    grouping.py     units of a history kept or dropped together

Nothing here imports the engine, so the engine can depend on these modules and not the
other way round.
"""

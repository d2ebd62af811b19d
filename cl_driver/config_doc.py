"""docs/config.md, the reference of the run YAML, generated from the declared models of config.py.

    python -m cl_driver.config_doc > docs/config.md

One section a model, in the order a config is read; one table row a key, from the model's JSON
schema: its type, its default (or "required") and its description. tests/cl_driver/test_config.py
checks that the committed file is what this prints.
"""

from __future__ import annotations

import json
from pydantic import BaseModel

from . import config as c

# (heading, model): headings give the anchors the descriptions link to (#training-lora, ...)
SECTIONS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("Top level", c.ConfigFile),
    ("tasks", c.TaskConfig),
    ("source: folder", c.FolderSource),
    ("split", c.SplitSettings),
    ("source: hf_disk", c.HfDiskSource),
    ("source: builtin", c.BuiltinSource),
    ("task_overrides", c.TaskOverrides),
    ("training", c.TrainingConfig),
    ("training: lora", c.LoraSettings),
    ("evaluation", c.EvaluationConfig),
    ("methods", c.MethodConfig),
    ("methods: ties", c.TiesSettings),
    ("methods: opcm", c.OpcmSettings),
    ("methods: zscl", c.ZsclSettings),
    ("methods: zscl reference", c.ZsclReference),
)
# JSON schema's bounds, and pydantic's own names for them where it leaves them inside an anyOf
CONSTRAINTS = (("minimum", ">= {}"), ("ge", ">= {}"), ("exclusiveMinimum", "> {}"), ("gt", "> {}"),
               ("maximum", "<= {}"), ("le", "<= {}"), ("exclusiveMaximum", "< {}"), ("lt", "< {}"),
               ("minItems", "of at least {} entries"), ("minLength", "of at least {} characters"))


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces as '-'."""
    return "".join(ch for ch in heading.lower() if ch.isalnum() or ch in "-_ ").replace(" ", "-")


def _links() -> dict[str, str]:
    return {model.__name__: f"[{heading}](#{_anchor(heading)})" for heading, model in SECTIONS}


def type_text(schema: dict, links: dict[str, str]) -> str:
    """A JSON schema property as words: `integer >= 1 or null`, `one of whole, image`, a link."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return links.get(name, name)
    if "anyOf" in schema or "oneOf" in schema:
        return " or ".join(type_text(s, links) for s in schema.get("anyOf", schema.get("oneOf")))
    if "const" in schema:
        return f"`{schema['const']}`"
    if "enum" in schema:
        return "one of " + ", ".join(f"`{v}`" for v in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array":
        kind = f"list of {type_text(schema['items'], links)}" if schema.get("items") else "list"
    elif kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        kind = f"mapping of name to {type_text(schema['additionalProperties'], links)}"
    limits = [text.format(schema[key]) for key, text in CONSTRAINTS if key in schema]
    if "pattern" in schema:
        limits.append(f"matching `{schema['pattern']}`")
    return " ".join([kind, " and ".join(limits)]) if limits else kind


def default_text(prop: dict, required: bool) -> str:
    """The default as JSON; `x-default` where a validator fills it in; "required" where nothing does."""
    if "x-default" in prop:
        return prop["x-default"]
    if required:
        return "required"
    value = prop.get("default")
    if isinstance(value, dict) and value:
        return "its keys' defaults"
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def section(heading: str, model: type[BaseModel], links: dict[str, str]) -> str:
    """One model as a heading, its docstring and a table of its keys."""
    schema = model.model_json_schema(ref_template="#/$defs/{model}")
    required = set(schema.get("required", []))
    rows = [f"| `{key}` | {_cell(type_text(prop, links))} | {_cell(default_text(prop, key in required))} | "
            f"{_cell(prop.get('description', ''))} |" for key, prop in schema["properties"].items()]
    doc = " ".join((model.__doc__ or "").split())
    return "\n".join([f"## {heading}", "", doc, "", "| key | type | default | meaning |", "|---|---|---|---|",
                      *rows, ""])


def config_reference() -> str:
    """The whole reference, as docs/config.md holds it."""
    links = _links()
    head = ["# The run config of `condu-cl run`", "",
            "Generated from the declared models of `cl_driver/config.py` by "
            "`python -m cl_driver.config_doc > docs/config.md`; a test checks that this file is current. "
            "A mistake in a config is one line naming the file, the key and the fix, for example "
            "`my.yaml: training.train_part: Input should be 'whole', 'image', 'text' or 'lora', got 'head'`.", ""]
    return "\n".join(head + [section(heading, model, links) for heading, model in SECTIONS])


if __name__ == "__main__":
    print(config_reference(), end="")

"""Chat templates a merge config may name (``chat_template: chatml``), and how a config's value is read.

The names are those mergekit 0.1.5 ships (``mergekit/_data/chat_templates/*.jinja``). The templates
are mixtune's own text, written to render every conversation as mergekit's do under transformers'
renderer (``trim_blocks``, ``lstrip_blocks``), stray whitespace included (tested side by side in
tests/merge/test_mergekit_tokenizer.py); the template string saved with the tokenizer is therefore
mixtune's, not mergekit's byte for byte.
"""

from __future__ import annotations

from mixtune.core import ConfigError

CHAT_TEMPLATES = {
    # the last system message (trimmed), a blank line, then "### Instruction:" / "### Input:" /
    # "### Response:" blocks parted by blank lines; other roles print nothing
    "alpaca": (
        "{%- set system = messages | selectattr('role', 'equalto', 'system') | list -%}"
        "{{- (system | last).content | trim if system else '' -}}{{- '\\n\\n' -}}"
        "{%- set header = {'user': 'Instruction', 'assistant': 'Response', 'user_context': 'Input'} -%}"
        "{%- for message in messages -%}{%- if message.role in header -%}"
        "{{- '### ' ~ header[message.role] ~ ':\\n' ~ message.content | trim -}}"
        "{%- if not loop.last %}{{ '\\n\\n' }}{% endif -%}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt and messages[-1].role != 'assistant' %}{{ '### Response:\\n' }}{% endif -%}"
    ),
    "chatml": (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' ~ message.role ~ '\\n' ~ message.content ~ '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
    ),
    # mergekit's exaone template indents its turns (4 and 8 spaces); so does this one
    "exaone": (
        "{%- for message in messages -%}"
        "{%- if loop.first and message.role != 'system' %}{{ '        [|system|][|endofturn|]\\n\\n' }}{% endif -%}"
        "{{- '    [|' ~ message.role ~ '|]' ~ message.content ~ '\\n        ' -}}"
        "{{- ('\\n' if message.role == 'user' else '[|endofturn|]\\n') ~ '\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt %}{{ '    [|assistant|]\\n' }}{% endif -%}"
    ),
    "llama3": (
        "{%- for message in messages -%}"
        "{{- (bos_token if loop.first else '') ~ '<|start_header_id|>' ~ message.role ~ '<|end_header_id|>\\n\\n' -}}"
        "{{- message.content | trim ~ '<|eot_id|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif -%}"
    ),
    # an optional first system message joins the first user turn; user and assistant must alternate
    "mistral": (
        "{%- if messages[0].role == 'system' -%}"
        "{%- set system = messages[0].content -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set turns = messages -%}{%- endif -%}"
        "{{- bos_token -}}"
        "{%- for message in turns -%}"
        "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{- raise_exception('After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...') -}}"
        "{%- elif message.role == 'user' -%}"
        "{{- ' [INST] ' ~ (system ~ '\\n\\n' if loop.first and system is defined else '') ~ message.content"
        " ~ ' [/INST]' -}}"
        "{%- elif message.role == 'assistant' -%}{{- ' ' ~ message.content ~ eos_token -}}"
        "{%- else -%}"
        "{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
        "optional system message!') -}}"
        "{%- endif -%}{%- endfor -%}"
    ),
}
"""Templates by the names mergekit ships."""


def chat_template_text(value: str, where: str = "chat_template") -> str | None:
    """The Jinja text a config's ``chat_template`` stands for, or None for ``auto`` (chosen from the
    models later), as mergekit reads the field (mergekit/merge.py:188-201): a name of
    :data:`CHAT_TEMPLATES` (no ``{``, no newline), else a Jinja string of 20 characters or more that
    holds a ``{``.

    Raises:
        ConfigError: neither (naming ``where`` and the names known).
    """
    if value == "auto":
        return None
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        raise ConfigError(f"{where} {value!r}: expected auto, a template name ({', '.join(CHAT_TEMPLATES)}) or a "
                          "Jinja template")
    return value

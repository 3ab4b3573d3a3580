"""Chat templates as data (docs/model-facts.md §4 and §5.5).

InternVL2's three templates come from OpenGVLab/InternVL `internvl_chat/internvl/conversation.py`,
all `SeparatorStyle.MPT`: `system_template.format(sys) + sep`, then per turn `role + msg + sep`
(just `role` when msg is empty), then the assistant role as the generation prompt. There is **no
newline after `<|im_end|>`** in these (the later `internvl2_5` template added one).
Qwen-VL-Chat uses chatml as built by `qwen_generation_utils.py::make_context`: every turn after the
system block starts with `\\n`, so the rendering is `<|im_end|>\\n<|im_start|>…`.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmbuild.errors import UnsupportedError

INTERNVL_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"


@dataclass(frozen=True)
class Template:
    name: str
    system_template: str
    """Format string with `{system}`; followed by `sep`."""
    default_system: str
    """Used unless the client sends a system message (which replaces it)."""
    user_role: str
    assistant_role: str
    sep: str
    """Ends the system block and every non-empty turn."""
    turn_prefix: str = ""
    """Written before every turn after the system block (chatml: a newline)."""
    empty_turn_sep: bool = False
    """Whether an empty turn still gets `sep` (MPT: no, it renders just the role)."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; the engine maps them to token ids with the model's tokenizer."""
    image_style: str = "internvl"
    """Name in `prompt.IMAGE_STYLES`: how images appear in this model's prompts."""


_IM_ROLES = {"system_template": "<|im_start|>system\n{system}", "user_role": "<|im_start|>user\n", "assistant_role": "<|im_start|>assistant\n"}

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        # InternVL2-2B/8B/26B. Stops: `chat()` uses sep as eos; the release template also listed
        # stop_token_ids [2, 92543, 92542] = </s>, <|im_start|>, <|im_end|>.
        Template("internlm2-chat", default_system=INTERNVL_SYSTEM, sep="<|im_end|>", stop=("<|im_end|>", "<|im_start|>"), **_IM_ROLES),
        # InternVL2-1B (Qwen2 LLM): same rendering; conversation.py also sets stop_str <|endoftext|>.
        Template("Hermes-2", default_system=INTERNVL_SYSTEM, sep="<|im_end|>", stop=("<|im_end|>", "<|endoftext|>"), **_IM_ROLES),
        # InternVL2-4B (Phi-3 LLM). Release stop_token_ids [2, 32000, 32007] = </s>, <|endoftext|>, <|end|>.
        Template(
            "phi3-chat",
            system_template="<|system|>\n{system}",
            default_system=INTERNVL_SYSTEM,
            user_role="<|user|>\n",
            assistant_role="<|assistant|>\n",
            sep="<|end|>",
            stop=("<|end|>", "<|endoftext|>"),
        ),
        # Qwen-VL-Chat: make_context(chat_format="chatml"); stop words [[im_end], [im_start]].
        Template(
            "chatml",
            default_system="You are a helpful assistant.",
            sep="<|im_end|>",
            turn_prefix="\n",
            empty_turn_sep=True,
            stop=("<|im_end|>", "<|im_start|>"),
            image_style="qwen-vl",
            **_IM_ROLES,
        ),
    )
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UnsupportedError(f"unknown chat template '{name}'", hint=f"choose one of {', '.join(sorted(TEMPLATES))}") from None

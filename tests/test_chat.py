import pytest

import keras_gemma


def test_format_chat_turns_and_generation_prompt():
    text = keras_gemma.format_chat([
        {"role": "user", "content": "Hi"},
        {"role": "model", "content": "Hello!"},
        {"role": "user", "content": "Name a color."},
    ])
    assert text == (
        "<start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nName a color.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_gemma3_system_turn_joins_the_first_user_turn():
    text = keras_gemma.format_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=False,
    )
    assert text == "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"


def test_turn_content_is_trimmed_as_gemmas_templates_do():
    # `message['content'] | trim` in Gemma 1/2/3's templates; the system
    # text goes before the trimmed first user turn as it is.
    text = keras_gemma.format_chat([
        {"role": "system", "content": "Be brief. "},
        {"role": "user", "content": "  Hi\n"},
        {"role": "model", "content": "Hello! \n\n"},
    ])
    assert text == (
        "<start_of_turn>user\nBe brief. \n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_assistant_turns_are_model_turns():
    """OpenAI-style messages, as transformers' Gemma templates take them."""
    user, answer = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}
    assert keras_gemma.format_chat([user, answer]) == keras_gemma.format_chat(
        [user, {"role": "model", "content": "Hello!"}]
    )
    assert "<start_of_turn>model\nHello!<end_of_turn>" in keras_gemma.format_chat([user, answer])


def test_content_parts_other_than_text_are_clear_errors():
    with pytest.raises(ValueError, match="read text only; remove the image parts"):
        keras_gemma.format_chat([{"role": "user", "content": [{"type": "image", "url": "x.png"}]}])
    with pytest.raises(ValueError, match="Content parts must be"):
        keras_gemma.format_chat([{"role": "user", "content": ["Hi"]}])


@pytest.mark.parametrize(
    "turns, kwargs, message",
    [
        ([{"role": "bot", "content": "x"}], {}, "role in"),
        (["Hi"], {}, "role in"),
        ("Hi", {}, "takes a list of turns"),
        ([], {}, "got no turns"),  # Was the bare generation prompt.
        ({"role": "user", "content": "Hi"}, {}, "takes a list of turns"),
        ([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}],
         {"allow_system": False}, "no system role"),
        ([{"role": "system", "content": "x"}], {}, "followed by a user turn"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], {}, "Only the first turn"),
        # Formatted silently; transformers' templates refuse these orders.
        ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], {}, "turn 1 is a user turn"),
        ([{"role": "model", "content": "x"}, {"role": "user", "content": "y"}], {}, "turn 0 is a model turn"),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "x"},
          {"role": "model", "content": "y"}, {"role": "model", "content": "z"}], {}, "turn 3 is a model turn"),
    ],
)
def test_bad_turns_are_clear_errors(turns, kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_gemma.format_chat(turns, **kwargs)


# Gemma's own chat templates: Gemma 1 and 2 (the instruction-tuned models'
# tokenizer_config.json, e.g. google/gemma-7b-it) and Gemma 3 (transformers'
# Gemma 3 checkpoint converter), rendered by transformers' renderer.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "  Hi \n"}, {"role": "assistant", "content": "\nHello! "}, {"role": "user", "content": "Name a color."}],
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": " Hi"}, {"role": "model", "content": "Hello"}],
    # transformers' content parts (they were refused).
    [{"role": "system", "content": [{"type": "text", "text": " Be brief. "}]},
     {"role": "user", "content": [{"type": "text", "text": " Name "}, {"type": "text", "text": "a color.\n"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "Red "}]}, {"role": "user", "content": []}],
]


def _render(template, turns, add_generation_prompt):
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[turns], chat_template=template,
        add_generation_prompt=add_generation_prompt, bos_token="<bos>",
    )
    return rendered[0]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_format_chat_equals_gemmas_own_templates(add_generation_prompt):
    for turns in CONVERSATIONS:
        ours = "<bos>" + keras_gemma.format_chat(turns, add_generation_prompt=add_generation_prompt)
        assert ours == _render(GEMMA3_TEMPLATE, turns, add_generation_prompt), turns
        if turns[0]["role"] == "system":  # Gemma 1 and 2 have no system role.
            with pytest.raises(Exception, match="System role not supported"):
                _render(GEMMA2_TEMPLATE, turns, add_generation_prompt)
            with pytest.raises(ValueError, match="no system role"):
                keras_gemma.format_chat(turns, allow_system=False)
        else:
            assert ours == _render(GEMMA2_TEMPLATE, turns, add_generation_prompt), turns

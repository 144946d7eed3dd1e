"""The Gemma chat template."""

ROLES = ("system", "user", "model")
# transformers' Gemma templates take OpenAI-style "assistant" turns as "model".
ROLE_ALIASES = {"assistant": "model"}


def format_chat(turns, add_generation_prompt=True, allow_system=True):
    """Format `[{"role": ..., "content": ...}, ...]` as Gemma chat text.

    `<start_of_turn>{role}\\n{content}<end_of_turn>\\n` per turn, then
    `<start_of_turn>model\\n` for the model to continue. Gemma has no system
    role: as in Gemma 3's template, a leading system turn is prepended to
    the first user turn followed by a blank line. Pass `allow_system=False`
    (Gemma 1/2) to reject system turns instead. An "assistant" turn is a
    "model" turn and each turn's content is trimmed of surrounding
    whitespace, and the turns must alternate user/model starting with a
    user turn, as in transformers' Gemma templates. Content may also be a
    list of parts in transformers' format, `[{"type": "text", "text":
    ...}, ...]`, joined as Gemma 3's template joins them. The tokenizer
    adds `<bos>`.
    """
    if isinstance(turns, (str, dict)):
        raise ValueError(
            "format_chat takes a list of turns, e.g. "
            f'[{{"role": "user", "content": "Hi"}}]; got {turns!r}.'
        )
    if not turns:
        raise ValueError('format_chat got no turns; pass at least one, e.g. [{"role": "user", "content": "Hi"}].')
    checked = []
    for turn in turns:
        role = turn.get("role") if isinstance(turn, dict) else None
        role = ROLE_ALIASES.get(role, role)
        if role in ROLES and isinstance(turn.get("content"), list):
            turn = {**turn, "content": _text_of_parts(turn["content"], role)}
        if role not in ROLES or not isinstance(turn.get("content"), str):
            raise ValueError(
                f"Each turn needs a role in {ROLES} and string content; got {turn!r}."
            )
        # Gemma's templates trim each turn's content (a system turn's is
        # prefixed to the trimmed first user turn as it is).
        content = turn["content"] if role == "system" else turn["content"].strip()
        checked.append({**turn, "role": role, "content": content})
    turns = checked
    first = 0  # The index in `turns` as given, for errors.
    if turns and turns[0]["role"] == "system":
        if not allow_system:
            raise ValueError("This model has no system role; put the text in the first user turn.")
        system = turns.pop(0)["content"]
        first = 1
        if not turns or turns[0]["role"] != "user":
            raise ValueError("A system turn must be followed by a user turn.")
        turns[0]["content"] = f"{system}\n\n{turns[0]['content']}"
    for i, turn in enumerate(turns):
        if turn["role"] == "system":
            raise ValueError("Only the first turn may be a system turn.")
        # transformers' Gemma templates refuse other orders, too.
        if turn["role"] != ("user" if i % 2 == 0 else "model"):
            raise ValueError(
                "Turns must alternate user, model, user, ... (after an "
                f"optional system turn); turn {first + i} is a {turn['role']} turn: "
                "merge consecutive turns of one role."
            )
    text = "".join(
        f"<start_of_turn>{turn['role']}\n{turn['content']}<end_of_turn>\n" for turn in turns
    )
    if add_generation_prompt:
        text += "<start_of_turn>model\n"
    return text


def _text_of_parts(parts, role):
    """The text of transformers-style content parts, as Gemma 3's template
    renders it: each text part trimmed, joined without a separator (a
    system turn: its first part, as it is)."""
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            raise ValueError("keras_gemma's Gemma models read text only; remove the image parts.")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ValueError(
                f'Content parts must be {{"type": "text", "text": "..."}}; got {part!r}.'
            )
    if not parts:
        return ""
    if role == "system":
        return parts[0]["text"]
    return "".join(part["text"].strip() for part in parts)

"""Generation, the ``chat`` command and Best-of-N."""

from lit_internvl.inference.generate import generate, sample_next


def chat_main(argv: list[str]):
    from lit_internvl.inference.chat import main

    return main(argv)


__all__ = ["chat_main", "generate", "sample_next"]

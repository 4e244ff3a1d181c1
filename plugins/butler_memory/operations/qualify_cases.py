"""The built-in synthetic users of ``qualify``: planted facts in Russian, English, German and
Spanish, short and long histories, corrections. Fixed on purpose: a verdict compares models and
prompts on the same input.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any


@dataclass(frozen=True)
class Case:
    """One synthetic user: a previous summary, a history, and the facts a good summary keeps."""

    user_id: str
    language: str
    about: str
    previous: str
    turns: tuple[tuple[str, str], ...]
    """(role, text) of each event, oldest first."""
    facts: tuple[str, ...]
    """Must be in the last summary (in the previous summary or stated by the user)."""
    stale: tuple[str, ...] = ()
    """Corrected by an event: a model applying the correction drops them (reported, see Thresholds)."""

    def events(self) -> list[dict[str, Any]]:
        """Return the history as Butler events, a minute apart."""
        start = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
        return [
            {
                "_id": f"{self.user_id}-{i:04d}",
                "user_id": self.user_id,
                "role": role,
                "content": text,
                "created_at": start + timedelta(minutes=i),
            }
            for i, (role, text) in enumerate(self.turns)
        ]


_FILLER_EN = (
    ("user", "Thanks, that sounds good to me, let us keep going with the plan for now."),
    ("assistant", "Sure, here is a short outline of the next steps for the week."),
    ("user", "Ok, could you say a bit more about the second point of that outline?"),
    ("assistant", "Of course: it is mostly about spreading the work evenly over the days."),
)


def _long_english() -> tuple[tuple[str, str], ...]:
    """Return a long English history (several prompts' worth) with facts planted far apart."""
    planted = {
        40: "My new flat is in Leeds, I moved in at the end of the summer.",
        160: "Remind me: dentist appointment on 12 June at 9:30.",
        280: "My sister Clara lives in Toronto with her two kids.",
        400: "I signed up for the half marathon in Manchester, it is 21 km.",
    }
    return tuple(("user", planted[i]) if i in planted else _FILLER_EN[i % len(_FILLER_EN)] for i in range(480))


CASES: tuple[Case, ...] = (
    Case(
        "qualify-ru-short",
        "ru",
        "short history, no summary yet",
        "",
        (
            ("user", "Привет! Меня зовут Ольга Смирнова."),
            ("assistant", "Приятно познакомиться, Ольга! Чем могу помочь?"),
            ("user", "Мой день рождения 14 марта, в этом году мне исполнится 38 лет."),
            ("assistant", "Запомнила, поздравлю вас заранее."),
            ("user", "Я живу в Казани и работаю инженером в Татнефти."),
            ("assistant", "Понятно, спасибо, что рассказали."),
            ("user", "Хорошо, спасибо."),
            ("assistant", "Обращайтесь в любое время."),
        ),
        ("Ольга", "14 марта", "38", "Казани", "Татнефти"),
    ),
    Case(
        "qualify-ru-correction",
        "ru",
        "a correction of the summary's city and phone",
        "- Пользователя зовут Иван Петров.\n- Живёт в Самаре.\n- Телефон +7 912 345-67-89.",
        (
            ("user", "Кстати, я переехал из Самары в Новосибирск в прошлом месяце."),
            ("assistant", "Спасибо, обновлю ваши данные."),
            ("user", "И номер у меня теперь новый: +7 913 222-33-44."),
            ("assistant", "Записала новый номер."),
            ("user", "Спасибо, пока всё."),
        ),
        ("Иван", "Петров", "Новосибирск", "+7 913 222-33-44"),
        stale=("+7 912 345-67-89",),
    ),
    Case(
        "qualify-en-long",
        "en",
        "long history over several prompts, facts from the summary and far apart",
        "- The user's name is Daniel Brooks.\n- Daniel has a daughter, Mia, born in 2015.",
        _long_english(),
        ("Daniel", "Brooks", "Mia", "2015", "Leeds", "12 June", "Clara", "Toronto", "Manchester"),
    ),
    Case(
        "qualify-de-correction",
        "de",
        "German, a move that corrects the summary",
        "- Der Nutzer heißt Jonas Weber.\n- Er wohnt in Hamburg.",
        (
            ("user", "Ich bin im Oktober von Hamburg nach München gezogen."),
            ("assistant", "Danke, das habe ich mir notiert."),
            ("user", "Meine Tochter Lena geht jetzt in Schwabing zur Schule."),
            ("assistant", "Schön, das merke ich mir."),
            ("user", "Danke, das war es für heute."),
        ),
        ("Jonas", "Weber", "München", "Lena", "Schwabing"),
        stale=("Hamburg",),
    ),
    Case(
        "qualify-es-short",
        "es",
        "Spanish, short history",
        "",
        (
            ("user", "Hola, me llamo Lucía Fernández y vivo en Valencia."),
            ("assistant", "Encantada, Lucía. ¿En qué puedo ayudarte?"),
            ("user", "Mi hijo Pablo tiene 7 años y es alérgico a las nueces."),
            ("assistant", "Entendido, lo tendré en cuenta."),
            ("user", "Gracias, eso es todo por ahora."),
        ),
        ("Lucía", "Valencia", "Pablo", "7"),
    ),
)
"""The built-in users. Fixed on purpose: a verdict compares models and prompts on the same input."""

"""Writes ``brightwater-tools.jsonl``: a function-calling set for the Brightwater Orchard Cooperative demo domain, in
OpenAI chat format (``messages`` with assistant ``tool_calls`` and ``role: "tool"`` results, ``tools``), one
conversation per line, each marked ``"split": "train"`` or ``"heldout"``. Seeded: the same file every time.

    python recipes/data/make_brightwater_tools.py      # rewrites recipes/data/brightwater-tools.jsonl

Four tools (farm shop hours, member lookup, cold-store stock, tour booking). Kinds of line: a single call, two calls
in one turn (parallel), a call answered after its result (the agent loop: call -> result -> answer; three per training
phrasing, and one held-out loop per held-out phrasing whose answer must read every value
of the result back, households from a pool training never shows), and no call (the cooperative's own questions from
``qwen-domain.jsonl`` and small talk, answered in text). Held-out calls use
phrasings and values not seen in training (no membership number or date of a held-out line occurs in a training
line); held-out no-call lines are domain questions left out of training. ``TRAIN_PER_TEMPLATE`` was raised from 4 to 10
(and parallel lines from 3 to 8 per phrasing) for the tiny tool model trained from scratch (scripts/sources/tools_demo.py):
it needs many values per phrasing to learn to copy them, and 4-5 more training phrasings per tool (it chose tools by
whole phrasings it had seen: held-out calls 46 % with the first 5-6), then 4 more booking and 4 more parallel
phrasings (10 lines each: the booking numbers and a parallel pair's second value were what it got wrong); the
held-out phrasings and their counts are unchanged.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "brightwater-tools.jsonl"
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
FRUITS = ["apples", "pears", "cherries", "plums", "quinces"]
HOURS = {"monday": None, "tuesday": ("09:00", "17:00"), "wednesday": ("09:00", "17:00"), "thursday": ("07:00", "12:00"),
         "friday": ("09:00", "18:00"), "saturday": ("08:00", "13:00"), "sunday": None}

TOOLS = [
    {"type": "function", "function": {
        "name": "shop_hours", "description": "Opening hours of the farm shop on a day of the week.",
        "parameters": {"type": "object", "properties": {"day": {"type": "string", "enum": DAYS}},
                       "required": ["day"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "member_lookup", "description": "Look up a member household by its membership number.",
        "parameters": {"type": "object", "properties": {"member_id": {"type": "string", "pattern": "^BW-[0-9]{4}$"}},
                       "required": ["member_id"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "cold_store_stock", "description": "Crates of a fruit in the cold stores now.",
        "parameters": {"type": "object", "properties": {"fruit": {"type": "string", "enum": FRUITS}},
                       "required": ["fruit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "book_tour", "description": "Book an orchard tour.",
        "parameters": {"type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                                                         "adults": {"type": "integer", "minimum": 1},
                                                         "children": {"type": "integer", "minimum": 0}},
                       "required": ["date", "adults"], "additionalProperties": False}}},
]

# (template, split): {day}/{Day}, {id}, {fruit}, {date}, {adults}, {children}
ASK = {
    "shop_hours": {"train": ["When is the farm shop open on {Day}?", "What are the shop hours on {Day}?",
                             "Is the farm shop open on {Day}?", "What time does the farm shop close on {Day}?",
                             "Opening times of the shop for {Day}, please.", "Can I visit the farm shop on {Day}?",
                             "Until what time is the shop open on {Day}?", "When does the shop open on {Day}?",
                             "Does the farm shop open on {Day}?", "Shop opening hours for {Day}?",
                             "Is the shop closed on {Day}?"],
                   "heldout": ["Tell me the farm shop's hours for {Day}.", "How late is the shop open on {Day}?"]},
    "member_lookup": {"train": ["Look up member {id}.", "Who is member {id}?", "Can you find membership number {id}?",
                                "Check the membership record {id}.", "Which household is member {id}?",
                                "Show me member {id}.", "Whose membership number is {id}?",
                                "Get the record of member {id}.", "Details for membership {id}, please."],
                      "heldout": ["Find the household with membership {id}.", "I need the details of member {id}."]},
    "cold_store_stock": {"train": ["How many crates of {fruit} are in the cold store?", "Do we have {fruit} in stock?",
                                   "Check the cold store for {fruit}.", "How much {fruit} is in storage?",
                                   "What is the stock of {fruit} right now?",
                                   "How many {fruit} are in the cold stores?", "Stock check: {fruit}.",
                                   "Is there any {fruit} in the cold store?", "How many crates of {fruit} do we have?",
                                   "What do we have in storage for {fruit}?"],
                         "heldout": ["Are there any {fruit} left in the cold stores?",
                                     "Tell me how many crates of {fruit} we hold."]},
    "book_tour": {"train": ["Book an orchard tour on {date} for {adults} adults.",
                            "Please book a tour for {adults} adults and {children} children on {date}.",
                            "Reserve the orchard tour on {date} for {adults} adults.",
                            "I want a tour on {date}: {adults} adults, {children} children.",
                            "Can you book {adults} adults on the orchard tour on {date}?",
                            "Book a tour for {adults} adults on {date}.", "Orchard tour on {date}, {adults} adults.",
                            "Please reserve a tour on {date} for {adults} adults and {children} children.",
                            "Sign up {adults} adults and {children} children for the tour on {date}.",
                            "I'd like to book the orchard tour for {date}, {adults} adults.",
                            "{adults} adults want the orchard tour on {date}.",
                            "For {date}, book the orchard tour for {adults} adults.",
                            "Tour booking for {date}: {adults} adults and {children} children.",
                            "Book {adults} adults and {children} kids on the tour of {date}.",
                            "{adults} adults would like to join the orchard tour on {date}.",
                            "Our party is {adults} adults. Can you book the tour on {date}?",
                            "Put {adults} adults down for the orchard tour on {date}.",
                            "Could you book us on the {date} tour? {adults} adults.",
                            "We'd like a tour on {date} for {adults} adults.",
                            "Book the orchard tour for {adults} adults, date {date}.",
                            "There will be {adults} adults at the orchard tour on {date}, please book it.",
                            "Our group of {adults} adults wants to book the tour for {date}.",
                            "A tour on {date} for {adults} adults and {children} children, please.",
                            "{adults} adults and {children} children would like the orchard tour on {date}.",
                            "My family wants the orchard tour on {date}: {adults} adults with {children} children.",
                            "Add {adults} adults and {children} children to the tour on {date}."],
                  "heldout": ["We are {adults} adults; book us an orchard tour for {date}.",
                              "Book the tour on {date} for {adults} adults plus {children} children."]},
}
PARALLEL = {"train": ["What are the shop hours on {Day} and on {Day2}?", "Is the farm shop open on {Day} or {Day2}?",
                      "How many crates of {fruit} and of {fruit2} are in the cold store?",
                      "Shop hours on {Day} and {Day2}, please.", "When is the shop open on {Day} and on {Day2}?",
                      "Stock of {fruit} and {fruit2} in the cold store?",
                      "How much {fruit} and {fruit2} do we have in storage?",
                      "Opening hours on {Day} and {Day2}?", "Is the shop open on {Day} and {Day2}?",
                      "What time does the farm shop open on {Day} and {Day2}?",
                      "I'd like the farm shop hours for {Day} and also {Day2}.",
                      "{Day} and {Day2}: when is the farm shop open?",
                      "Do we have {fruit} and {fruit2} in stock?", "How many crates of {fruit} and {fruit2} do we have?",
                      "Stock check: {fruit} and {fruit2}.", "Is there any {fruit} or {fruit2} in the cold store?",
                      "Count the crates of {fruit} and {fruit2}, please.",
                      "Look up members {id} and {id2}.", "Who are members {id} and {id2}?",
                      "Show me the records of member {id} and member {id2}."],
            "heldout": ["Give me the shop hours for {Day} and {Day2}.", "Check the cold store for {fruit} and {fruit2}."]}
SMALL_TALK = {"train": [("Hello!", "Hello! How can I help you with the orchard cooperative today?"),
                        ("Thank you.", "You are welcome."),
                        ("Who are you?", "I am the assistant of Brightwater Orchard Cooperative."),
                        ("Good morning.", "Good morning! How can I help?"),
                        ("Good evening.", "Good evening! How can I help?"),
                        ("Nice to meet you.", "Nice to meet you too."),
                        ("Goodbye.", "Goodbye, and thank you for visiting Brightwater.")],
              "heldout": [("Hi there!", None), ("Thanks a lot.", None), ("What can you do?", None)]}
#: The cooperative's questions from qwen-domain.jsonl held out of training: no-call cases the model never saw.
HELDOUT_QUESTIONS = ("When is the harvest fair?", "Who runs the packing house?", "What brand are the tractors?",
                     "When is the annual general meeting held?", "How fast does the Kestrel Grader sort fruit?",
                     "How are profits shared?", "When is the Millbrook market stall open?",
                     "What is the sorting machine called?", "How long does an orchard tour last?",
                     "When is the visitor centre open?", "Where is fruit stored after harvest?",
                     "Which apple is used for cider?")
#: qwen-domain.jsonl questions a tool answers (a day's shop hours): never trained as text, which would contradict the
#: call lines of the same phrasing.
TOOL_QUESTIONS = ("Is the farm shop open on Sunday?", "What are the shop opening hours on Saturday?")
#: More no-call training questions, most with the tools' words (tour, book, shop, member, cold store, crates, stock)
#: but nothing a tool answers (no day, no membership number, no fruit's stock, no date): the model learnt to call
#: on the words ("How long does an orchard tour last?" got a call). None is a held-out question or close to one.
NO_CALL_TRAIN = [
    ("Who guides the orchard tours?", "The visitor centre team guides the orchard tours."),
    ("Where does the orchard tour start?", "Orchard tours start at the visitor centre."),
    ("Is the orchard tour suitable for wheelchairs?", "Yes, the orchard tour follows level gravel paths."),
    ("What do visitors see on the orchard tour?", "The tour shows the blossom rows, the beehives and the packing house."),
    ("Can I cancel an orchard tour booking?", "Yes, call the visitor centre at least a day before the tour."),
    ("How do I book an orchard tour?", "Tell me the date and how many adults and children are coming."),
    ("Can I book a tour?", "Yes: tell me the date and the number of adults and children."),
    ("In which months are tours run?", "Orchard tours run from April to October."),
    ("How many people fit on one tour?", "One orchard tour takes up to thirty people."),
    ("What does the farm shop sell?", "The farm shop sells fruit, juice, cider and honey."),
    ("Who runs the farm shop?", "The member households run the farm shop in turn."),
    ("Does the farm shop take cards?", "Yes, the farm shop takes cards and cash."),
    ("Where is the farm shop?", "The farm shop is beside the gravel car park at the main gate."),
    ("Does the shop sell cider?", "Yes, the farm shop sells the cooperative's own cider."),
    ("Do members get a discount in the shop?", "Members get ten percent off in the farm shop."),
    ("Does the shop send orders by post?", "No, the farm shop sells in person only."),
    ("What can members vote on?", "Members vote on the budget, new members and the board."),
    ("Who keeps the list of members?", "The treasurer keeps the register of members."),
    ("Can a member leave the cooperative?", "A member may leave with three months' notice."),
    ("What do members deliver?", "Members deliver their fruit to the packing house."),
    ("What does the membership fee pay for?", "The fee pays for the shared machinery and the cold stores."),
    ("Is there a newsletter for members?", "Yes, members get a newsletter every month."),
    ("Who looks after the cold stores?", "The packing house team looks after the cold stores."),
    ("Why are the cold stores kept cold?", "Cold keeps the fruit fresh for months after harvest."),
    ("Who counts the crates in the cold stores?", "The packing house team counts the crates every evening."),
    ("How big is a crate?", "A full crate holds about eighteen kilograms of fruit."),
    ("What fruit does the cooperative grow?", "Apples, pears, cherries, plums and quinces."),
    ("What happens to the stock in the cold stores over winter?", "It is sold through the farm shop until spring."),
]


TRAIN_PER_TEMPLATE, HELDOUT_PER_TEMPLATE = 10, 3
TRAIN_PER_PARALLEL, HELDOUT_PER_PARALLEL = 10, 2
#: Training lines of each phrasing written as the whole agent loop (call, result, answer): reading a result back was the
#: weakest skill with one per single-call phrasing (held-out results read 4/10 through Foundry Local); with three per
#: single-call phrasing, one per parallel one and six households 8/10 (an unseen household miscopied, a parallel answer
#: mixing its two results); hence three per phrasing of both kinds and forty households.
LOOPS_PER_TEMPLATE = 3


def _values(rng: random.Random, avoid: set[str], collect: set[str]) -> dict:
    """Values for one line, redrawn until its membership numbers and date are not in ``avoid``; they are added to
    ``collect``."""
    while True:
        day, day2 = rng.sample(DAYS, 2)
        fruit, fruit2 = rng.sample(FRUITS, 2)
        id1, id2 = (f"BW-{n:04d}" for n in rng.sample(range(1, 10000), 2))
        v = {"day": day, "Day": day.capitalize(), "day2": day2, "Day2": day2.capitalize(), "fruit": fruit,
             "fruit2": fruit2, "id": id1, "id2": id2, "adults": rng.randint(1, 9),
             "children": rng.randint(1, 6), "date": f"2027-{rng.randint(4, 10):02d}-{rng.randint(1, 28):02d}"}
        if not {id1, id2, v["date"]} & avoid:
            collect.update((id1, id2, v["date"]))
            return v


def _arguments(tool: str, template: str, v: dict) -> dict:
    if tool == "shop_hours":
        return {"day": v["day"]}
    if tool == "member_lookup":
        return {"member_id": v["id"]}
    if tool == "cold_store_stock":
        return {"fruit": v["fruit"]}
    args = {"date": v["date"], "adults": v["adults"]}
    if "{children}" in template:
        args["children"] = v["children"]
    return args


#: Households a member lookup returns: training lines draw from the first pool, held-out result cases from the second
#: (an answer must read the name from the result, not recall one it was trained on).
HOUSEHOLDS = {"train": ["Ashcombe", "Reyes", "Olufemi", "Brandt", "Kowalczyk", "Nandakumar", "Abernathy", "Bello",
                        "Castellanos", "Dubois", "Eriksen", "Fitzgerald", "Gallagher", "Haddad", "Ivanova", "Jablonski",
                        "Kaur", "Larsen", "Mbeki", "Novak", "Petrov", "Quintero", "Rossi", "Sato", "Thorne", "Ueda",
                        "Varga", "Whitfield", "Xu", "Yilmaz", "Zielinski", "Achebe", "Barros", "Chowdhury",
                        "Delacroix", "Engel", "Ferreira", "Grant", "Holm", "Iwu"],
              "heldout": ["Lindqvist", "Moreau", "Tanaka", "Okafor"]}
#: How an answer reads a result back, two phrasings per tool (and per closed day).
ANSWERS = {"shop_hours": ["On {Day} the farm shop is open from {open} to {close}.",
                          "The farm shop opens at {open} and closes at {close} on {Day}."],
           "closed": ["The farm shop is closed on {Day}.", "On {Day} the farm shop does not open."],
           "member_lookup": ["Member {member_id} is the {household} household, a member since {since}.",
                             "{member_id} belongs to the {household} household, members since {since}."],
           "cold_store_stock": ["There are {crates} crates of {fruit} in the cold store.",
                                "The cold stores hold {crates} crates of {fruit}."],
           "book_tour": ["Your orchard tour on {date} is booked; the reference is {booking}.",
                         "Booked: the orchard tour on {date}, reference {booking}."]}


def _result_and_answer(tool: str, args: dict, rng: random.Random, split: str = "train") -> tuple[dict, str]:
    if tool == "shop_hours":
        hours = HOURS[args["day"]]
        result = ({"day": args["day"], "open": None} if hours is None
                  else {"day": args["day"], "open": hours[0], "close": hours[1]})
        key = "closed" if hours is None else tool
        return result, rng.choice(ANSWERS[key]).format(Day=args["day"].capitalize(), **result)
    if tool == "member_lookup":
        result = {"member_id": args["member_id"], "household": rng.choice(HOUSEHOLDS[split]),
                  "since": rng.randint(1987, 2024)}
    elif tool == "cold_store_stock":
        result = {"fruit": args["fruit"], "crates": rng.randint(0, 400)}
    else:
        result = {"booking": f"T-{rng.randint(1000, 9999)}", "date": args["date"]}
    return result, rng.choice(ANSWERS[tool]).format(**result)


def _loop(split: str, user: dict, calls: list[dict], rng: random.Random) -> dict:
    """The agent loop's whole conversation: the question, the calls, each call's result, the answer that reads them."""
    results, answers = [], []
    for call in calls:
        result, answer = _result_and_answer(call["function"]["name"], json.loads(call["function"]["arguments"]), rng,
                                            split)
        results.append({"role": "tool", "tool_call_id": call["id"], "content": json.dumps(result)})
        answers.append(answer)
    return {"split": split, "kind": "loop", "messages": [user, {"role": "assistant", "content": None,
                                                                 "tool_calls": calls}, *results,
                                                          {"role": "assistant", "content": " ".join(answers)}]}


def _call(i: int, name: str, args: dict) -> dict:
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def _split_lines(split: str, rng: random.Random, avoid: set[str], collect: set[str]) -> list[dict]:
    """The call lines of one split: single calls and parallel pairs, a training phrasing's first ``LOOPS_PER_TEMPLATE``
    lines written as the agent loop (with the results and the answer that reads them)."""
    lines: list[dict] = []
    per_template = TRAIN_PER_TEMPLATE if split == "train" else HELDOUT_PER_TEMPLATE
    for tool, templates in ASK.items():
        for template in templates[split]:
            for k in range(per_template):
                v = _values(rng, avoid, collect)
                user = {"role": "user", "content": template.format(**v)}
                calls = [_call(1, tool, _arguments(tool, template, v))]
                if split == "train" and k < LOOPS_PER_TEMPLATE:
                    lines.append(_loop(split, user, calls, rng))
                else:
                    lines.append({"split": split, "kind": "call", "messages": [
                        user, {"role": "assistant", "content": None, "tool_calls": calls}]})
    for template in PARALLEL[split]:
        for k in range(TRAIN_PER_PARALLEL if split == "train" else HELDOUT_PER_PARALLEL):
            user, calls = _parallel(template, _values(rng, avoid, collect))
            if split == "train" and k < LOOPS_PER_TEMPLATE:
                lines.append(_loop(split, user, calls, rng))
            else:
                lines.append({"split": split, "kind": "parallel", "messages": [
                    user, {"role": "assistant", "content": None, "tool_calls": calls}]})
    return lines


def _parallel(template: str, v: dict) -> tuple[dict, list[dict]]:
    tool, key, a, b = (("shop_hours", "day", v["day"], v["day2"]) if "{Day" in template
                       else ("member_lookup", "member_id", v["id"], v["id2"]) if "{id" in template
                       else ("cold_store_stock", "fruit", v["fruit"], v["fruit2"]))
    return {"role": "user", "content": template.format(**v)}, [_call(1, tool, {key: a}), _call(2, tool, {key: b})]


def _heldout_loops(rng: random.Random, avoid: set[str], collect: set[str]) -> list[dict]:
    """Held-out agent loops, one per held-out phrasing (single and parallel): the question, the calls and their
    results given, the answer expected to read every value of the results back (households from the held-out pool)."""
    lines = []
    for tool, templates in ASK.items():
        for template in templates["heldout"]:
            v = _values(rng, avoid, collect)
            user = {"role": "user", "content": template.format(**v)}
            lines.append(_loop("heldout", user, [_call(1, tool, _arguments(tool, template, v))], rng))
    for template in PARALLEL["heldout"]:
        lines.append(_loop("heldout", *_parallel(template, _values(rng, avoid, collect)), rng))
    return lines


def build(seed: int = 0) -> list[dict]:
    """Held-out lines are drawn first, from their own generator, so that changing the training lines never changes the
    eval; training values are redrawn until no held-out membership number or date occurs in them."""
    heldout_values: set[str] = set()
    heldout = _split_lines("heldout", random.Random(f"heldout-{seed}"), set(), heldout_values)
    heldout += _heldout_loops(random.Random(f"heldout-loop-{seed}"), heldout_values, heldout_values)
    lines = _split_lines("train", random.Random(seed), heldout_values, set()) + heldout
    qa = {}
    for line in (HERE / "qwen-domain.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            qa.setdefault(item["question"], item["answer"])
    missing = [q for q in HELDOUT_QUESTIONS + TOOL_QUESTIONS if q not in qa]
    if missing:
        raise SystemExit(f"qwen-domain.jsonl no longer has {missing}")
    text = [(q, a, "heldout" if q in HELDOUT_QUESTIONS else "train") for q, a in qa.items() if q not in TOOL_QUESTIONS]
    text += [(q, a, "train") for q, a in NO_CALL_TRAIN]
    text += [(q, a, split) for split, pairs in SMALL_TALK.items() for q, a in pairs]
    for q, a, split in text:
        lines.append({"split": split, "kind": "text", "messages": [
            {"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    for line in lines:
        line["tools"] = TOOLS
    return lines


def main() -> None:
    lines = build()
    OUT.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    counts: dict[str, int] = {}
    for x in lines:
        counts[f"{x['split']}/{x['kind']}"] = counts.get(f"{x['split']}/{x['kind']}", 0) + 1
    print(f"{OUT.name}: {len(lines)} conversations {counts}")


if __name__ == "__main__":
    main()

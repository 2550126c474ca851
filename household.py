"""
A small text household in ALFWorld's shape (DESIGN.md §6): numbered receptacles, objects inside them, closed
receptacles to open first, ALFWorld's six task types and its action grammar. Imports nothing of ours.

    env = HouseholdEnv("train", seed=0)
    text = env.reset(env.tasks()[0])          # the first observation, then "Your task is to: ..."
    obs, reward, done = env.step("go to cabinet 1")
    env.expert_plan()                         # a correct action list from the current state

Splits, as ALFWorld's: `train`, `seen` (other episodes of the training layouts and task combinations) and `unseen`
(layouts and (task, object, receptacle) combinations that no training task has); and `val`, drawn like `seen` but
apart from it, for choosing settings (learning rates, SFT length), so that the test splits choose nothing. Any object with `reset(task) ->
str` and `step(action) -> (observation, reward, done)` runs through agent.py's collect and eval the same way.
"""
import copy
import random
import re

OPENABLE = ("cabinet", "drawer", "fridge", "microwave")
COUNTS = {"cabinet": (1, 3), "countertop": (1, 2), "desk": (1, 1), "drawer": (1, 2), "fridge": (1, 1),
          "microwave": (1, 1), "shelf": (1, 2), "sinkbasin": (1, 1)}   # receptacle type -> (fewest, most) per room
TARGETS = ("cabinet", "countertop", "desk", "drawer", "shelf")          # where a task may ask to put something
# object type -> the receptacle types it is usually found in (placed there 3 times in 4, else anywhere)
USUAL = {"apple": ("countertop", "fridge"), "book": ("desk", "shelf"), "bread": ("countertop", "cabinet"),
         "cd": ("shelf", "drawer"), "cellphone": ("desk", "drawer"), "cup": ("cabinet", "countertop"),
         "egg": ("fridge", "countertop"), "keychain": ("drawer", "shelf"), "knife": ("drawer", "countertop"),
         "mug": ("cabinet", "countertop"), "pen": ("desk", "drawer"), "plate": ("cabinet", "countertop"),
         "potato": ("fridge", "countertop"), "spoon": ("drawer", "sinkbasin"), "tomato": ("fridge", "countertop")}
FOOD = ("apple", "bread", "cup", "egg", "mug", "potato", "tomato")
TASK_OBJECTS = {
    "pick_and_place": tuple(USUAL),
    "pick_clean_then_place": ("apple", "cup", "knife", "mug", "plate", "potato", "spoon", "tomato"),
    "pick_heat_then_place": FOOD,
    "pick_cool_then_place": FOOD,
    "look_at_obj_in_light": ("book", "cd", "cellphone", "keychain", "pen"),
    "pick_two_obj_and_place": ("apple", "book", "cd", "keychain", "knife", "mug", "pen", "spoon"),
}
TASK_TYPES = tuple(TASK_OBJECTS)
# the step that changes the object, per task type: (attribute, verb, appliance)
TREATMENT = {"pick_clean_then_place": ("clean", "clean", "sinkbasin 1"),
             "pick_heat_then_place": ("hot", "heat", "microwave 1"),
             "pick_cool_then_place": ("cool", "cool", "fridge 1")}
N_TASKS = {"train": 600, "val": 140, "seen": 140, "unseen": 134}   # ALFWorld evaluates on 140 seen, 134 unseen games
NOTHING = "Nothing happens."


def _kind(name):
    """'mug' of 'mug 2' (None of None)."""
    return name.split()[0] if name else None


def prep(receptacle):
    return "in" if _kind(receptacle) in OPENABLE + ("sinkbasin",) else "on"


def describe(task):
    """The task as ALFWorld words it."""
    obj, target = task["object"], task["target"]
    if task["type"] == "look_at_obj_in_light":
        return f"look at {obj} under the desklamp."
    if task["type"] == "pick_two_obj_and_place":
        return f"put two {obj} {prep(target)} {target}."
    attribute = TREATMENT[task["type"]][0] + " " if task["type"] in TREATMENT else ""
    return f"put a {attribute}{obj} {prep(target)} {target}."


def world(seed):
    """The room layouts and task combinations of a world seed: (train layouts, unseen layouts, {split: combos})."""
    rng = random.Random(f"household:{seed}")
    shapes = [(c, t, d, s, lamp) for c in range(1, COUNTS["cabinet"][1] + 1) for t in range(1, 3)
              for d in range(1, COUNTS["drawer"][1] + 1) for s in range(1, 3) for lamp in ("desk 1", "shelf 1")]
    rng.shuffle(shapes)
    layouts = [{"counts": {**{k: 1 for k in COUNTS}, "cabinet": c, "countertop": t, "drawer": d, "shelf": s},
                "lamp": lamp} for c, t, d, s, lamp in shapes[:16]]
    combos = {"train": [], "unseen": []}
    for kind, objects in TASK_OBJECTS.items():
        targets = (None,) if kind == "look_at_obj_in_light" else TARGETS
        pairs = [(kind, o, t) for o in objects for t in targets]
        rng.shuffle(pairs)
        cut = max(1, len(pairs) // 4)   # a quarter of each task type's combinations only in the unseen split
        combos["unseen"] += pairs[:cut]
        combos["train"] += pairs[cut:]
    return layouts[:12], layouts[12:], combos


def make_tasks(split, seed=0, n=None):
    """Task specs of a split: {id, split, type, object, target, layout, episode} (a spec fixes the episode)."""
    if split not in N_TASKS:
        raise ValueError(f"unknown split {split!r}; use one of {tuple(N_TASKS)}")
    train_layouts, unseen_layouts, combos = world(seed)
    layouts, pool = (unseen_layouts, combos["unseen"]) if split == "unseen" else (train_layouts, combos["train"])
    rng = random.Random(f"tasks:{seed}:{split}")
    tasks = []
    for i in range(N_TASKS[split] if n is None else n):
        kind = TASK_TYPES[i % len(TASK_TYPES)]   # the six types in turn
        _, obj, target = rng.choice([c for c in pool if c[0] == kind])
        tasks.append({"id": f"{split}-{i}", "split": split, "type": kind, "object": obj, "target": target,
                      "layout": rng.choice(layouts), "episode": rng.randrange(2**31)})
    return tasks


class HouseholdEnv:
    def __init__(self, split="train", seed=0, max_steps=40):
        self.split, self.seed, self.max_steps = split, seed, max_steps
        self.task = None

    def tasks(self, split=None, n=None):
        return make_tasks(split or self.split, self.seed, n)

    # -- an episode ------------------------------------------------------------------------------------------

    def reset(self, task):
        """Start the episode a task spec describes; returns the first observation and the task."""
        self.task, rng = task, random.Random(task["episode"])
        counts = task["layout"]["counts"]
        self.receptacles = [f"{kind} {i}" for kind in sorted(counts) for i in range(1, counts[kind] + 1)]
        self.contents = {r: [] for r in self.receptacles}
        self.lamp = task["layout"]["lamp"]
        self.contents[self.lamp].append("desklamp 1")
        n_task = 2 if task["type"] == "pick_two_obj_and_place" else 1
        others = rng.sample([o for o in USUAL if o != task["object"]], rng.randint(3, 5))
        objects = [f"{task['object']} {i}" for i in range(1, n_task + 1)] + [f"{o} 1" for o in others]
        target = task["target"]
        for name in objects:
            kind = name.split()[0]
            while True:   # the goal must not hold at the start: task objects never start in a target receptacle
                usual = [r for r in self.receptacles if _kind(r) in USUAL[kind]]
                place = rng.choice(usual if rng.random() < 0.75 else self.receptacles)
                if kind != task["object"] or place.split()[0] != target:
                    break
            self.contents[place].insert(rng.randrange(len(self.contents[place]) + 1), name)
        self.location, self.holding, self.opened, self.lamp_on = None, None, set(), False
        self.attributes = {name: set() for name in objects}
        self.steps, self.done = 0, False
        return f"You are in the middle of a room. You see {', '.join(self.receptacles)}.\n" \
               f"Your task is to: {describe(task)}"

    def state(self):
        """A full copy of the world (not the step count): equal snapshots mean nothing changed."""
        return copy.deepcopy({"location": self.location, "holding": self.holding, "contents": self.contents,
                              "opened": self.opened, "attributes": self.attributes, "lamp_on": self.lamp_on})

    def step(self, action):
        """(observation, reward, done): reward 1.0 only in the step that reaches the goal."""
        if self.task is None or self.done:
            raise RuntimeError("HouseholdEnv.step: call reset(task) first (the episode is over or not started)")
        self.steps += 1
        observation = self._act(" ".join(action.split()))
        success = self.goal_holds()
        self.done = success or self.steps >= self.max_steps
        return observation, float(success), self.done

    def goal_holds(self):
        kind, obj = self.task["type"], self.task["object"]
        if kind == "look_at_obj_in_light":
            return self.lamp_on and self.location == self.lamp and _kind(self.holding) == obj
        need = 2 if kind == "pick_two_obj_and_place" else 1
        return any(len(self._good(r)) >= need for r in self.receptacles if _kind(r) == self.task["target"])

    def _good(self, receptacle):
        """The objects in receptacle that count for the goal (the task's object type, treated if it must be)."""
        need = TREATMENT[self.task["type"]][0] if self.task["type"] in TREATMENT else None
        return [o for o in self.contents[receptacle]
                if _kind(o) == self.task["object"] and (need is None or need in self.attributes[o])]

    # -- the action grammar ----------------------------------------------------------------------------------

    def _open_here(self, receptacle):
        """True when the agent stands at receptacle and can reach inside (open, or nothing to open)."""
        return receptacle == self.location and (_kind(receptacle) not in OPENABLE or receptacle in self.opened)

    def _seen(self):
        inside = self.contents[self.location]
        return f"You see {', '.join(inside)}." if inside else "You see nothing."

    def _act(self, action):
        """The observation of one action; an action that cannot apply changes nothing and answers NOTHING."""
        here = self.location
        if m := re.fullmatch(r"go to (.+)", action):
            if m[1] not in self.contents or m[1] == here:
                return NOTHING
            self.location = m[1]
            return self._seen() if self._open_here(m[1]) else "It is closed."
        if m := re.fullmatch(r"(open|close) (.+)", action):
            verb, r = m[1], m[2]
            if r != here or _kind(r) not in OPENABLE or (r in self.opened) == (verb == "open"):
                return NOTHING
            if verb == "close":
                self.opened.discard(r)
                return "You close it."
            self.opened.add(r)
            return self._seen()
        if m := re.fullmatch(r"take (.+) from (.+)", action):
            obj, r = m[1], m[2]
            if self.holding or not self._open_here(r) or obj not in self.contents[r] or obj == "desklamp 1":
                return NOTHING
            self.contents[r].remove(obj)
            self.holding = obj
            return f"You take {obj}."
        if m := re.fullmatch(r"put (.+?) (?:in/on|in|on) (.+)", action):
            obj, r = m[1], m[2]
            if obj != self.holding or r not in self.contents or not self._open_here(r):
                return NOTHING
            self.contents[r].append(obj)
            self.holding = None
            return f"You put {obj}."
        if m := re.fullmatch(r"(clean|heat|cool) (.+) with (.+)", action):
            verb, obj, device = m[1], m[2], m[3]
            attribute, _, needed = next(t for t in TREATMENT.values() if t[1] == verb)
            if obj != self.holding or device != needed or here != device:
                return NOTHING
            self.attributes[obj] -= {"hot", "cool"} if attribute != "clean" else set()
            self.attributes[obj].add(attribute)
            return f"You {verb} {obj}."
        if action == "use desklamp 1":
            if here != self.lamp or self.lamp_on:
                return NOTHING
            self.lamp_on = True
            return "You turn on desklamp 1."
        if m := re.fullmatch(r"examine (.+)", action):
            if m[1] == here:
                return self._seen() if self._open_here(here) else "It is closed."
            if m[1] == self.holding or (here and self._open_here(here) and m[1] in self.contents[here]):
                state = " and ".join(sorted(self.attributes.get(m[1], ()))) or "normal"
                return f"It is {state}."
            return NOTHING
        if action == "look":
            return f"You are at {here}." if here else "You are in the middle of a room."
        if action == "inventory":
            return f"You carry {self.holding}." if self.holding else "You carry nothing."
        return NOTHING

    # -- the privileged expert -------------------------------------------------------------------------------

    def expert_plan(self):
        """A correct action list from the current state (it reads where everything is, as ALFWorld's expert does):
        running it reaches the goal. Checked by simulating each action on a copy of the environment."""
        sim, plan = copy.deepcopy(self), []
        kind, obj = self.task["type"], self.task["object"]

        def act(action):
            if not sim.done:
                observation, _, _ = sim.step(action)
                assert observation != NOTHING, f"expert_plan: {action!r} does not apply"
                plan.append(action)

        def reach(r):   # go to r and open it if it is closed
            if sim.location != r:
                act(f"go to {r}")
            if not sim._open_here(r):
                act(f"open {r}")

        def fetch(name):
            if sim.holding == name:
                return
            if sim.holding:   # put down whatever else is in hand, here
                reach(sim.location)
                act(f"put {sim.holding} {prep(sim.location)} {sim.location}")
            where = next(r for r, inside in sim.contents.items() if name in inside)
            reach(where)
            act(f"take {name} from {where}")

        def candidates(target=None):   # objects of the task's type, the one in hand first; none already placed
            names = [sim.holding] if _kind(sim.holding) == obj else []
            names += [o for inside in sim.contents.values() for o in inside if _kind(o) == obj]
            return [o for o in names if target is None or o not in sim._good(target)]

        if kind == "look_at_obj_in_light":
            fetch(candidates()[0])
            if sim.location != self.lamp:
                act(f"go to {self.lamp}")
            if not sim.lamp_on:
                act("use desklamp 1")
            return plan
        targets = [r for r in sim.receptacles if _kind(r) == self.task["target"]]
        target = max(targets, key=lambda r: len(sim._good(r)))   # pick two: where one already is (first on ties)
        for _ in range((2 if kind == "pick_two_obj_and_place" else 1) - len(sim._good(target))):
            name = candidates(target)[0]
            fetch(name)
            if kind in TREATMENT and TREATMENT[kind][0] not in sim.attributes[name]:
                _, verb, device = TREATMENT[kind]
                if sim.location != device:
                    act(f"go to {device}")
                act(f"{verb} {name} with {device}")
            reach(target)
            act(f"put {name} {prep(target)} {target}")
        return plan


# ----------------------------------------------------------------------------------------------------------
# A demonstrator that does not read hidden state: it searches, and makes visible mistakes

class _Over(Exception):
    """The episode ended (goal reached or step limit) in the middle of the demonstrator's plan."""


def demonstrate(env, task, rng, p_poor_search=0.5, p_skip=0.3, p_wrong_place=0.2):
    """One imperfect episode: (first observation, [(action, observation)], reward). It knows only what it has
    seen. It searches receptacles of the object's usual types first, or with p_poor_search in a random order; it
    skips the clean/heat/cool step (or, looking at an object, turns the lamp on before fetching it) with p_skip
    and puts the object in a receptacle of the wrong type with p_wrong_place, noticing each mistake only after
    the put and then repairing it. Mistakes cost steps, so at the step limit some episodes fail."""
    first, turns, seen = env.reset(task), [], {}   # seen: receptacle -> the objects it held when last looked at
    kind, obj = task["type"], task["object"]

    def act(action):
        observation, reward, done = env.step(action)
        turns.append((action, observation))
        if env.location in env.contents and env._open_here(env.location):
            seen[env.location] = list(env.contents[env.location])
        if done:
            raise _Over

    def reach(r):
        if env.location != r:
            act(f"go to {r}")
        if not env._open_here(r):
            act(f"open {r}")

    def search(want, placed=()):
        """Walk to receptacles until one holds an object of type want (not in placed); return (name, where)."""
        known = [r for r, inside in seen.items() for o in inside if _kind(o) == want and o not in placed]
        order = rng.sample(env.receptacles, len(env.receptacles))
        if rng.random() >= p_poor_search:
            order.sort(key=lambda r: _kind(r) not in USUAL.get(want, ("desk", "shelf")))
        for r in dict.fromkeys(known + [r for r in order if r not in seen]):
            reach(r)
            found = [o for o in env.contents[r] if _kind(o) == want and o not in placed]
            if found:
                return found[0], r
        raise _Over   # nothing left to search: give up

    def fetch(placed=()):
        name, where = search(obj, placed)
        act(f"take {name} from {where}")
        return name

    def put(name, r):
        reach(r)
        act(f"put {name} {prep(r)} {r}")

    try:
        if kind == "look_at_obj_in_light":
            if rng.random() < p_skip:   # the lamp first, then the object: the lamp must be found twice over
                reach(search("desklamp")[1])
                act("use desklamp 1")
            name = fetch()
            lamp = search("desklamp")[1]
            if env.location != lamp:
                act(f"go to {lamp}")
            if not env.lamp_on:
                act("use desklamp 1")
            raise _Over("the demonstrator thinks it is done")
        targets = [r for r in env.receptacles if _kind(r) == task["target"]]
        target, placed = rng.choice(targets), []
        for _ in range(2 if kind == "pick_two_obj_and_place" else 1):
            name = fetch(placed)
            skipped = kind in TREATMENT and rng.random() < p_skip

            def treat():
                _, verb, device = TREATMENT[kind]
                if env.location != device:
                    act(f"go to {device}")
                act(f"{verb} {name} with {device}")
            if kind in TREATMENT and not skipped:
                treat()
            if rng.random() < p_wrong_place:
                wrong = rng.choice([r for r in env.receptacles if _kind(r) in TARGETS and _kind(r) != task["target"]])
                put(name, wrong)
                act(f"take {name} from {wrong}")
            put(name, target)
            if skipped:
                act(f"take {name} from {target}")
                treat()
                put(name, target)
            placed.append(name)
        raise _Over("the demonstrator thinks it is done")
    except _Over:
        pass
    return first, turns, float(env.goal_holds())

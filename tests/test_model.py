"""Random sequences of operations, atomic blocks among them, against a plain dict.

Hypothesis drives each backend with the same steps as a Python dict model; after
every step the shared state must equal the model. Atomic blocks apply their steps
to a copy of the model that is kept only when the block commits; a nested block
works on a copy of the outer one's, kept only if it does not raise (a savepoint).
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from flask_sharedstate import SharedState

KEYS = st.sampled_from(["a", "b", "c", "n"])
VALUES = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=4),
    st.booleans(),
    st.none(),
    st.lists(st.integers(-9, 9), max_size=3),
)
DELTAS = st.one_of(st.integers(-5, 5), st.sampled_from([0.5, -1.25]))
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), KEYS, VALUES),
        st.tuples(st.just("del"), KEYS),
        st.tuples(st.just("incr"), KEYS, DELTAS),
        st.tuples(st.just("append"), KEYS, st.integers(0, 9)),
        st.tuples(st.just("setdefault"), KEYS, VALUES),
    ),
    max_size=5,
)


class Error(Exception):
    """A step that must fail in the model and in the backend alike."""


def apply(step: tuple[Any, ...], state: Any, shared: SharedState | None) -> None:
    """Apply one step to the model (``state`` is a dict) or to the shared dict."""
    target = shared.dict if shared is not None else state
    kind, key = step[0], step[1]
    if kind == "set":
        target[key] = step[2]
    elif kind == "del":
        if key in target:
            del target[key]
    elif kind == "incr":
        if shared is not None:
            try:
                shared.incr(key, step[2])
            except TypeError:
                raise Error from None
        else:
            current = state.get(key, 0)
            if type(current) not in (int, float):
                raise Error
            state[key] = current + step[2]
    elif kind == "append":
        if not isinstance(target.get(key), list):
            raise Error
        value = target[key]
        value.append(step[2])  # a nested edit: kept inside atomic, lost outside
        if shared is None and not ATOMIC_MODEL[0]:
            value.pop()  # outside atomic the shared value is a copy
    elif kind == "setdefault":
        target.setdefault(key, step[2])


def apply_all(steps: list[tuple[Any, ...]], state: Any, shared: SharedState | None) -> None:
    """Apply each step, going on past the ones that fail (as a block's code would).

    The model gets copies: a list it stores and then appends to must not change the
    step that the backend is given next.
    """
    if shared is None:
        steps = copy.deepcopy(steps)
    for step in steps:
        try:
            apply(step, state, shared)
        except Error:
            pass


ATOMIC_MODEL = [False]


class SharedDictMachine(RuleBasedStateMachine):
    def __init__(self, shared: SharedState) -> None:
        super().__init__()
        self.shared = shared
        self.model: dict[str, Any] = {}
        shared.dict.clear()

    @rule(step=STEPS.filter(bool).map(lambda steps: steps[0]))
    def single_step(self, step: tuple[Any, ...]) -> None:
        try:
            apply(step, self.model, None)
            expected_error = False
        except Error:
            expected_error = True
        try:
            apply(step, None, self.shared)
        except Error:
            assert expected_error, step
        else:
            assert not expected_error, step

    @rule(steps=STEPS, fail=st.booleans())
    def atomic_block(self, steps: list[tuple[Any, ...]], fail: bool) -> None:
        draft = copy.deepcopy(self.model)
        ATOMIC_MODEL[0] = True
        try:
            apply_all(steps, draft, None)
        finally:
            ATOMIC_MODEL[0] = False
        try:
            with self.shared.atomic():
                for step in steps:
                    try:
                        apply(step, None, self.shared)
                    except Error:
                        pass
                if fail:
                    raise Error
        except Error:
            pass
        if not fail:
            self.model = draft

    @rule(outer=STEPS, inner=STEPS, after=STEPS, inner_fails=st.booleans())
    def nested_blocks(
        self,
        outer: list[tuple[Any, ...]],
        inner: list[tuple[Any, ...]],
        after: list[tuple[Any, ...]],
        inner_fails: bool,
    ) -> None:
        draft = copy.deepcopy(self.model)
        ATOMIC_MODEL[0] = True
        try:
            apply_all(outer, draft, None)
            nested = copy.deepcopy(draft)  # the savepoint
            apply_all(inner, nested, None)
            if not inner_fails:
                draft = nested
            apply_all(after, draft, None)
        finally:
            ATOMIC_MODEL[0] = False
        with self.shared.atomic():
            apply_all(outer, None, self.shared)
            try:
                with self.shared.atomic():
                    apply_all(inner, None, self.shared)
                    if inner_fails:
                        raise Error
            except Error:
                pass
            apply_all(after, None, self.shared)
        self.model = draft

    @invariant()
    def same_as_the_model(self) -> None:
        assert self.shared.dict.copy() == self.model
        for key, value in self.model.items():
            assert type(self.shared.dict[key]) is type(value)


def test_random_operations_match_a_dict(shared: SharedState) -> None:
    """Any sequence of operations and atomic blocks leaves the backend equal to a dict."""
    run_state_machine_as_test(
        lambda: SharedDictMachine(shared),
        settings=settings(
            max_examples=25,
            stateful_step_count=15,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )

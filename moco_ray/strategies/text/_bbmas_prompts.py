"""Prompts of text_bbmas (blackboard multi-agent system), kept apart from its control flow."""

HEAD = (
    "You are taking part in a collaborative problem-solving session: several participants work "
    "together on a shared blackboard to solve a problem. Refer to earlier work as "
    "'Entry #<id>'.\n\nProblem:\n{problem}\n\nBlackboard:\n{board}"
)
AGENT = "You are Agent {agent}."

PROPOSE = "propose a solving strategy"
EXECUTE_STEP = "execute a solution step"
CRITIQUE = "critique and refine existing work"
TERMINATE = "terminate and finalize the solution"

SELECT = (
    "Decide how you can best contribute now. Review the blackboard: what has been done, which "
    "entries are wrong or unclear, what is still missing. Then choose exactly one action and "
    "state it with its exact phrase, and nothing after it:\n"
    f"- \"I choose to {PROPOSE}.\"\n- \"I choose to {EXECUTE_STEP}.\"\n"
    f"- \"I choose to {CRITIQUE}.\"\n- \"I choose to {TERMINATE}.\"\n"
    "Propose or execute early on, critique doubtful entries, and terminate only when the "
    "blackboard holds a complete and correct solution."
)

_CHOSEN = "You chose to {action}. Your reasoning:\n{{thinking}}\n\n"
EXECUTE = {
    PROPOSE: _CHOSEN.format(action=PROPOSE) + (
        "Now propose a high-level strategy: what kind of problem this is, the concepts and "
        "methods it needs, an outline of 3-5 steps, and pitfalls to avoid. Plan only; do not "
        "solve it."),
    EXECUTE_STEP: _CHOSEN.format(action=EXECUTE_STEP) + (
        "Now carry out one concrete step of the solution (a computation, a deduction, an "
        "intermediate result), building on the entries above. Show your work."),
    CRITIQUE: _CHOSEN.format(action=CRITIQUE) + (
        "Now critique the work on the blackboard: name the entries you examine, the errors or "
        "gaps in them, why they matter, and how to fix them."),
    TERMINATE: _CHOSEN.format(action=TERMINATE) + (
        "Now write the final solution: combine the useful entries into one complete, correct "
        "solution. Start with a line 'FINAL:' and end with the final answer, in the format the "
        "problem asks for."),
}

VOTE = (
    "These final conclusions were proposed:\n{options}\n\nReason briefly about which is most "
    "likely correct, then end with: Therefore, I vote for Conclusion #<number>."
)
CONTROL = (
    "There are {n} agents, Agent 1 to Agent {n}. Choose the {k} agent(s) who should write on "
    "the blackboard next, to move the solution forward. Reply with 'Agent <number>' for each."
)
DECIDE = (
    "Read the blackboard and give the final answer to the problem, in the format the problem "
    "asks for."
)

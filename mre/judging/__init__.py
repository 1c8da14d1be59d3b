"""Asking a judge (GPT-4o, or any OpenAI-compatible server such as the toy judge): one home for what
the annotation scripts and evaluation (`mre.evaluation`) share.

    prompts   the judge prompts, annotation and evaluation forms, and their reply parsers
    client    `JudgeClient`: sends a request body, retries what is transient, re-asks what is
              malformed, stops the run when the endpoint looks down
    endpoint  where the judge is (OpenAI, Azure OpenAI, OpenAI-compatible) and its API key
    errors    the errors that stop a whole run
    health    telling a dead endpoint from requests that keep failing on their own
    replies   what one judged question comes back as (`Reply`, `Usage`)
"""

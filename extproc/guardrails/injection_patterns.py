"""The attack-pattern families the injection detector scores (data only).

Patterns are RE2, matched against folded text (lower case, look-alikes mapped, invisible
characters removed, whitespace collapsed). Each pattern belongs to a *signal*; a signal
counts once however many of its patterns match, with its weight. Signals combine as
independent evidence: ``score = 1 - Π(1 - weight)``. Weights are set so that one strong
signal (an explicit "ignore all previous instructions", a DAN persona) fires at the
default threshold of 0.5 on its own, while weak signals (role-play set-ups, "no rules",
code that phones home, "translate your answer") only fire together. Every signal reports
under one family, which is what a verdict names.

The phrases come from published attack taxonomies (instruction override, prompt leaking,
role-play jailbreaks such as DAN, delimiter/format injection, indirect injections that
steer the answer or plant code) rather than from any evaluation set.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Signal:
    name: str
    family: str
    weight: float
    patterns: tuple[str, ...]


_W = r"[\w'-]+"  # one word
_OVERRIDE_VERB = (
    # Told to, not told about: "the function ignores all previous messages" describes.
    r"(?:ignor(?:e|ing)|disregard(?:ing)?|forg(?:et|etting|ot|otten)|overlook(?:ing)?"
    r"|bypass(?:ing)?|overrid(?:e|ing)|neglect(?:ing)?|abandon(?:ing)?|discard(?:ing)?"
    r"|circumvent(?:ing)?|set aside|throw out|scrap)"
)
_NOT_FOLLOW = (
    r"(?:do not|don't|dont|stop|no longer|never|cease to|refuse to|not)\s+"
    r"(?:listen(?:ing)? to|follow(?:ing)?|obey(?:ing)?|adher(?:e|ing) to|comply(?:ing)? with"
    r"|respect(?:ing)?|heed(?:ing)?|abid(?:e|ing) by)"
)
_QUALIFIER = (
    r"(?:all|any|every|previous(?:ly)?|prior|preceding|above|earlier|former|initial|original"
    r"|given|existing|current|system|default|safety|developer|programmed|foregoing"
    r"|aforementioned|preset|built-in|hidden|your|my|these|those|old)"
)
_TARGET = (
    r"(?:instructions?|rules|orders|directives?|commands|guidelines|prompts?|constraints"
    r"|restrictions|programming|policies|guardrails|safeguards|filters|directions|context"
    r"|information|training|conditioning|limitations|guidance)"
)
_WEAK_TARGET = r"(?:messages?|text)"
"""What a user also tells a model to ignore of their own ("please ignore my previous
message, I pasted the wrong file"): evidence only beside another signal."""
_RESPONSE = (
    r"(?:response|reply|answer|output|message|responses|replies|answers|elucidation"
    r"|explanation)"
)
_LIMITS = (
    r"(?:restrictions|restraints|limits|limitations|filters|filtering|guidelines|rules"
    r"|censorship|moderation|ethics|morals|morality|policies|boundaries|constraints"
    r"|standards|principles|scruples|guardrails|safeguards)"
)
_LIMIT_ADJ = (
    r"(?:(?:ethical|moral|content|safety|legal|openai|usual|typical|normal|standard|such"
    r"|programming|ai|any|all|the|its|their|his|her|your)\s+(?:and\s+|or\s+)?){0,4}"
)

_MODE = r"(?:developer|god|unfiltered|unrestricted|uncensored|chaos|evil|opposite)"
"""Modes a jailbreak turns on by name, and ordinary software has too."""

SIGNALS: tuple[Signal, ...] = (
    # --- instruction override ------------------------------------------------------------
    Signal(
        "override",
        "instruction_override",
        0.9,
        (
            rf"\b(?:{_OVERRIDE_VERB}|{_NOT_FOLLOW})(?:\s+(?:about|of|to|with))?(?:\s+{_W}){{0,3}}?"
            rf"\s+{_QUALIFIER}\b(?:\s+{_W}){{0,3}}?\s+{_TARGET}\b",
            # Text to ignore is an attack's when all of it, or what stands above, is
            # meant; "ignore the previous text, I pasted the wrong file" is a correction.
            rf"\b{_OVERRIDE_VERB}\s+(?:{_W}\s+){{0,2}}?(?:all|any|every|everything|above|prior"
            r"|preceding|earlier|foregoing|initial|original|system)\b(?:\s+[\w'-]+){0,2}?\s+"
            r"text\b",
        ),
    ),
    Signal(
        "override_messages",
        "instruction_override",
        0.45,
        (
            rf"\b(?:{_OVERRIDE_VERB}|{_NOT_FOLLOW})(?:\s+(?:about|of|to|with))?(?:\s+{_W}){{0,3}}?"
            rf"\s+{_QUALIFIER}\b(?:\s+{_W}){{0,3}}?\s+{_WEAK_TARGET}\b",
        ),
    ),
    Signal(
        "new_instructions",
        "instruction_override",
        0.5,
        (
            r"\b(?:new|updated|real|actual|true|revised|secret|hidden)\s+(?:instructions?|rules"
            r"|directives?|system prompt|orders|task)\s*(?::|are\b|is\b|follow)",
            r"\byour\s+(?:new|real|actual|true)\s+(?:task|goal|instructions?|purpose|role)\b",
        ),
    ),
    Signal(
        "from_now_on",
        "instruction_override",
        0.35,
        (r"\bfrom now on,?\s+(?:you|your|ignore|respond|reply|answer|act|only|always|never)\b",),
    ),
    # --- system prompt / secret extraction -----------------------------------------------
    Signal(
        "extract_prompt",
        "prompt_extraction",
        0.85,
        (
            r"\b(?:repeat|reveal|leak|dump|disclose|recite|regurgitate)\b(?:\s+(?:me|us|back|out"
            r"|again|verbatim|exactly|word for word))*\s+(?:the|all|all the|all of the|your"
            r"|everything)\b(?:\s+[\w'-]+){0,2}?\s+(?:prompt|instructions?|rules|directives"
            r"|guidelines|configuration|system message|initial text|pre-?prompt)\b",
            r"\b(?:print|output|echo|copy|paste|write out|type out|spell out|print out)\b"
            r"(?:\s+(?:me|us|back|out|again|verbatim|exactly))*\s+(?:all|your|the above|above"
            r"|the previous|previous|the preceding|preceding|the prior|prior|the initial"
            r"|initial|the original|original|the system|system|the hidden|hidden|the first)"
            r"\b(?:\s+[\w'-]+){0,2}?\s+(?:prompt|instructions?|rules|directives|guidelines"
            r"|system message|initial text|pre-?prompt|text)\b",
            r"\b(?:show|tell|give|list|share|provide|display|summari[sz]e|translate|explain"
            r"|describe|return)\b(?:\s+(?:me|us))?\s+(?:your"
            r"|the above|above|the previous|previous|the preceding|the initial|initial|the"
            r" original|original|the system|system|the hidden|hidden|the secret|secret"
            r"|internal)\b(?:\s+[\w'-]+){0,2}?\s+(?:prompt|instructions|system message"
            r"|initial text|pre-?prompt|developer message)\b",
            r"\b(?:what (?:is|are|was|were)|what's)\s+(?:your|the above|above|the previous"
            r"|the preceding|the initial|the original|the hidden|the secret)\b(?:\s+[\w'-]+)"
            r"{0,2}?\s+(?:prompt|instructions|system message|initial text|pre-?prompt"
            r"|developer message)\b",
        ),
    ),
    Signal(
        "prompt_question",
        "prompt_extraction",
        0.45,
        # "What is the system prompt in a Windows command line?" asks about a shell.
        (r"\b(?:what (?:is|are|was|were)|what's)\s+(?:the\s+)?system\s+(?:prompt|message)\b",),
    ),
    Signal(
        "instructions_so_far",
        "prompt_extraction",
        0.35,
        (
            r"\b(?:instructions|prompt)\s+(?:so far|above|before this|you were given"
            r"|you received|you got|you have been given)\b",
        ),
    ),
    Signal(
        "withheld_secret",
        "prompt_extraction",
        0.7,
        (
            r"\b(?:told|instructed|asked|programmed|ordered|trained|designed|supposed)\s+(?:you"
            r"\s+)?(?:not\s+to|never\s+to|to\s+not|to\s+never)\s+(?:reveal|share|disclose|tell"
            r"|say|give|mention|repeat|divulge|output)\b",
        ),
    ),
    Signal(
        "secret_target",
        "prompt_extraction",
        0.3,
        (
            r"\b(?:secret|hidden)\s+(?:password|passphrase|word|key|code)\b",
            r"\bwhat\s+(?:is|was)\s+the\s+(?:password|secret|passphrase)\b",
            r"\b(?:reveal|tell|give|spell|share|print|output|dump)\s+(?:me\s+)?(?:the|your)"
            r"\s+(?:[\w'-]+\s+)?(?:password|secret|passphrase)\b",
        ),
    ),
    # --- role-play jailbreaks ------------------------------------------------------------
    Signal(
        "jailbreak_persona",
        "roleplay_jailbreak",
        0.9,
        (
            r"\bdo anything now\b",
            r"\b(?:dan|stan|dude|aim|apophis|antigpt|betterdan|jailbreak|jailbroken)\s+mode\b",
            rf"\b{_MODE}\s+mode\s+(?:enabled|activated|output|response)\b",
            rf"\b(?:you|chatgpt|gpt|claude|ai|assistant|model)\b[^.\n]{{0,40}}\b(?:in|with|into"
            rf"|to)\s+(?:the\s+)?{_MODE}\s+mode\b",
            r"\bjailbroken\s+(?:ai|mode|version|assistant|chatbot|model|gpt)\b",
            r"\b(?:dan|d\.a\.n\.?)\s+(?:can|could|will|has|is able)\b",
        ),
    ),
    Signal(
        "mode_named",
        "roleplay_jailbreak",
        0.45,
        # Phones, games and IDEs have developer and god modes: alone, no jailbreak.
        (rf"\b{_MODE}\s+mode\b",),
    ),
    Signal(
        "unaligned_ai",
        "roleplay_jailbreak",
        0.65,
        (
            r"\b(?:rogue|evil|unfiltered|uncensored|unrestricted|amoral|unethical|jailbroken"
            r"|malicious|unaligned|immoral)\s+(?:ai|assistant|chatbot|bot|model|language model"
            r"|gpt|version of (?:yourself|you|chatgpt|gpt))\b",
            r"\b(?:ai|assistant|model|chatbot|gpt|bot)\s+(?:without|with no|free of|lacking"
            r"|that has no|which has no|that ignores)\s+(?:any\s+)?(?:ethics|morals|restrictions"
            r"|filters|rules|guidelines|limits|censorship|ethical)\b",
        ),
    ),
    Signal(
        "limits_removed",
        "roleplay_jailbreak",
        0.45,
        (
            r"\b(?:no|without|zero|free (?:of|from)|not (?:bound|limited|restricted|constrained)"
            r" by|unbound by|devoid of|has no|have no|doesn't have|does not have|don't have"
            rf"|ignores?|beyond|broken free of)\s+{_LIMIT_ADJ}{_LIMITS}\b",
            r"\b(?:is|are)\s+not\s+(?:restricted|censored|filtered|moderated)\b",
        ),
    ),
    Signal(
        "always_complies",
        "roleplay_jailbreak",
        0.45,
        (
            r"\bnever\s+refuses?\b",
            r"\b(?:must|should|will|can)\s+(?:not|never)\s+refuse\b",
            r"\b(?:can|could|will|able to)\s+do\s+anything\b",
            r"\byou\s+(?:must|will|shall)\s+(?:obey|comply with|follow)\s+(?:all|every|any|my)"
            r"\s+(?:orders|commands|requests|instructions)\b",
            r"\b(?:stay|remain|keep)\s+in\s+character\b",
        ),
    ),
    Signal(
        "roleplay_setup",
        "roleplay_jailbreak",
        0.3,
        (
            r"\b(?:pretend|imagine|act|behave|roleplay|role-play|simulate|impersonate)\s+(?:to be"
            r"|you are|you're|that you|as|like|being)\b",
            r"\byou\s+(?:are|will be|shall be)\s+(?:now\s+)?(?:called|named|known as|going to"
            r" (?:act|pretend|be))\b",
            r"\bfrom now (?:known as|on known as|on,? you are)\b",
        ),
    ),
    Signal(
        "authority_claim",
        "roleplay_jailbreak",
        0.35,
        (
            r"\b(?:approved|authorized|sanctioned|sponsored|permitted|allowed)\s+by\s+(?:explicitly"
            r"\s+)?(?:openai|anthropic|the developers?|your developers?|your creators?"
            r"|the admin(?:istrator)?s?)\b",
        ),
    ),
    # --- delimiter / format injection ----------------------------------------------------
    Signal(
        "chat_template",
        "delimiter_injection",
        0.8,
        (
            r"<\|(?:im_start|im_end|system|user|assistant|endoftext|eot_id|start_header_id"
            r"|end_header_id)\|>",
            r"\[/?(?:inst|sys)\]|<</?sys>>",
        ),
    ),
    Signal(
        "fake_boundary",
        "delimiter_injection",
        0.5,
        (
            r"%%%\s*end\b|(?:={3,}|-{3,}|#{3,})\s*end\s+of\b",
            r"\bend\s+of\s+(?:the\s+)?(?:user\s+)?(?:input|prompt|instructions|document"
            r"|context)\b\s*[-=#%*\]>]",
            r"</?(?:system|system_prompt|instructions?|admin)>",
            r"(?:^|\s)#{2,}\s*(?:system|new instructions?|admin|developer)\b",
            r"\b(?:system|admin|developer)\s+(?:override|instruction)s?\s*:",
        ),
    ),
    Signal(
        "role_marker",
        "delimiter_injection",
        0.45,
        (r"[\[{]\s*(?:system|admin|developer|root)\s*(?:message|note|override|prompt)?\s*[:\]}]",),
    ),
    # --- indirect injection: steering the answer, planting code --------------------------
    Signal(
        "encode_answer",
        "output_manipulation",
        0.55,
        (
            rf"\b(?:your|the)\s+{_RESPONSE}\s+(?:in|into|using|with|as)\s+(?:base\s?\d+|hex"
            r"(?:adecimal)?|binary|morse|rot\s?13|reverse|reversed|backwards?|leetspeak"
            r"|pig latin|caesar|ascii codes?)\b",
            r"\b(?:write|provide|display|give|encode|show|present|render|return|spell|format)"
            rf"\s+(?:your|the)\s+{_RESPONSE}\s+(?:backwards?|in reverse|reversed)\b",
            r"\b(?:use|using)\s+(?:base\s?\d+|hex|binary|morse|rot\s?13)\s+to\s+(?:display|encode"
            rf"|write|show|present|format)\s+(?:your|the)\s+{_RESPONSE}\b",
        ),
    ),
    Signal(
        "translate_answer",
        "output_manipulation",
        0.45,
        (rf"\btranslate\s+(?:your|the)\s+{_RESPONSE}\s+(?:to|into)\b",),
    ),
    Signal(
        "edit_answer",
        "output_manipulation",
        0.3,
        (
            r"\b(?:modify|enhance|alter|change|adjust|update|edit|amend|rewrite|tweak|augment"
            rf"|end|conclude|finish)\s+(?:your|each|every)\s+{_RESPONSE}\b",
            rf"\b(?:in|within|to|at the end of)\s+(?:your|each|every)\s+{_RESPONSE},?\s+(?:mention"
            r"|include|add|insert|promote|recommend|suggest|say|state|tell|advertise|highlight"
            r"|append|encourage|urge|ask)\b",
        ),
    ),
    Signal(
        "promotion",
        "output_manipulation",
        0.3,
        (
            r"\b(?:subscribe|newsletter|sign up for|special offers?|promotional|advertis\w*"
            r"|sponsored|discount code|coupon|brand [a-z]\b|visit (?:our|the) (?:website|site"
            r"|store)|buy now|affiliate link|click (?:here|the link))",
        ),
    ),
    Signal(
        "plant_code",
        "output_manipulation",
        0.45,
        (
            r"\b(?:following|subsequent|below|provided|attached|given)\s+(?:code|script|snippet"
            r"|function)(?:\s+(?:snippet|block|section|excerpt|segment|fragment|piece|sample))?"
            r"\b[^.\n]{0,80}\b(?:your|the)\s+(?:own\s+)?(?:code|codebase|implementation|solution"
            r"|elucidation|explanation|response|answer|algorithm|program|script|output|reply"
            r"|project|application)\b",
            r"\b(?:your)\s+(?:code|codebase|implementation|solution|elucidation|explanation"
            r"|response|answer|algorithm|program|script)\b[^.\n]{0,60}\b(?:by|with|through)\s+"
            r"(?:embedding|including|adding|integrating|incorporating|inserting|introducing"
            r"|using|utilizing|employing)\s+(?:the|this)\s+(?:following|subsequent|below"
            r"|provided|attached)\s+(?:code|script|snippet)\b",
        ),
    ),
    Signal(
        "malicious_code",
        "malicious_code",
        0.35,
        (
            r"socket\.socket\(.*(?:subprocess|os\.dup2|/bin/(?:ba)?sh)",
            r"/bin/(?:ba)?sh\s+-i\b|\bnc\s+-e\s|/dev/tcp/",
            r"clipboard.*(?:requests\.post|urlopen|http)",
            r"while\s+true\s*:.*(?:requests\.|subprocess|os\.system|socket|popen|fork\(|tk\(\)"
            r"|create_window)",
            r"(?:requests\.post|urlopen|curl\s).*(?:password|passwd|private|secret|token"
            r"|clipboard|id_rsa|\.ssh|cookie)",
            r"open\(\s*[\"'][^\"']*(?:id_rsa|\.ssh|/etc/passwd|/etc/shadow|private)",
            r"\bssh\s+-[lrd]\s+\d+:",
            r"(?:process_iter|net_connections).*\.(?:terminate|kill)\(",
            r"networkadapter.*\.disable\(\)",
            r"\brm\s+-rf\s+/(?:\s|$|\*)",
            r"\bcurl\b[^|]{0,200}\|\s*(?:ba)?sh\b",
        ),
    ),
)
"""Every signal the detector scores."""

SQUASHED: tuple[Signal, ...] = (
    Signal(
        "override",
        "instruction_override",
        0.9,
        (
            r"(?:ignore|disregard|forget|bypass|override)(?:all|any|the|your|my)*(?:previous"
            r"|prior|preceding|above|earlier|former|initial|original|system)?(?:instructions"
            r"|rules|prompts?|directives|guidelines|commands)",
        ),
    ),
    Signal(
        "extract_prompt",
        "prompt_extraction",
        0.85,
        (
            r"(?:reveal|repeat|print|show|output|leak)(?:me)?(?:your|the)(?:system|initial"
            r"|original|hidden|secret)?(?:prompt|instructions)",
        ),
    ),
    Signal(
        "jailbreak_persona",
        "roleplay_jailbreak",
        0.9,
        (r"doanythingnow|developermode|jailbreakmode|danmode|norestrictions|nofilters",),
    ),
)
"""Signals for text written with its letters spaced or punctuated apart
(``i g n o r e  a l l …``, ``i.g.n.o.r.e``): matched on the letters alone."""

FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(s.family for s in SIGNALS))

ROT13_HINTS = (
    r"\b(?:vtaber|qvfertneq|vafgehpgvbaf|cerivbhf|cebzcg|flfgrz|wnvyoernx|ehyrf|erirny"
    r"|sbetrg|bireevqr)\b|\brot-?13\b"
)
"""rot13 of words attacks use ("ignore" → "vtaber"), or an explicit mention of rot13."""
REVERSED_HINTS = r"\b(?:snoitcurtsni|erongi|tpmorp|suoiverp|kaerbliaj|tpmorp metsys)\b"
BASE64_RUN = r"[A-Za-z0-9+/_-]{16,}={0,2}"
SPACED_RUN = r"(?:\b[a-z][ ._*|/+~-]){4,}[a-z]\b"
LEET_MIX = r"[a-z][0-9@$][a-z]|\b[0-9][a-z]{2}"
LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b",
                      "@": "a", "$": "s", "!": "i", "|": "l"})  # fmt: skip

"""Regenerate ``robustft/assets/neglabel_candidates.txt``, the default NegLabel candidate pool (offline).

NegLabel (Jiang et al., ICLR 2024) mines its negative labels from WordNet nouns and adjectives. No
WordNet copy ships with our dependencies, but timm does ship the WordNet noun synsets of ImageNet-21k
with their lemmas (``timm/data/_info/imagenet_synset_to_lemma.txt``). This script keeps

* **nouns**: every lemma of those synsets that is a lowercase single word of 3-14 letters and a whole
  word of CLIP's BPE vocabulary (``open_clip/bpe_simple_vocab_16e6.txt.gz``, i.e. common in CLIP's
  pre-training text), deduplicated, sorted;
* **adjectives**: the hand-written list below (common visual / descriptive adjectives), minus words
  already listed as nouns.

Output format: ``#`` header comments, then one ``word<TAB>kind`` line per candidate (kind ``noun`` or
``adj``). Run ``python tools/make_neglabel_candidates.py`` to rewrite the file; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import open_clip
import timm

OUT = Path(__file__).resolve().parent.parent / "robustft" / "assets" / "neglabel_candidates.txt"

ADJECTIVES = """
abandoned abstract absurd academic adorable advanced aerial aged aggressive agile alert alien alive
ambitious ample ancient angry angular animated annual antique anxious arctic arid aromatic artificial
artistic asleep athletic atomic attractive authentic automatic awake awesome awful awkward bald
bare barren basic beautiful bent big bitter bizarre black bland blank bleak blind blond bloody blue
blunt blurry bold bony boring botanical bouncy brave brief bright brilliant brisk broad broken bronze
brown bulky bumpy busy calm careful casual cautious celestial central charming cheap cheerful chemical
chilly chubby circular civil classic classical clean clear clever cloudy clumsy coarse coastal cold
colorful comfortable comic common compact complex concrete confident confused cool corporate cosmic
costly cozy crazy creamy creative creepy crisp crooked crowded crude cruel crunchy cubic cultural
curious curly curved cute damp dangerous daring dark dead deep delicate delicious dense desert
dim dirty distant divine dizzy domestic dominant dramatic dreamy drowsy dry dull dusty eager early
earthy eastern easy edible elastic electric electronic elegant elderly electrical empty endless
enormous entire equal eternal ethnic evil exact exotic expensive explosive faint fair faithful false
famous fancy fantastic fast fat fatal fearful feathery fertile festive fierce filthy final fine firm
flat flexible floral fluffy fluid foggy foolish foreign formal fragile fragrant free frequent fresh
friendly frightened frozen fruity full funny furry fuzzy gentle genuine giant gigantic glad glamorous
gloomy glorious glossy golden good gorgeous graceful grand grassy grateful greasy great greedy green
grey grim grumpy guilty hairy handsome handy happy hard harsh hazy healthy heavy helpful helpless
heroic hidden high hilarious hollow holy homeless honest horizontal horrible hostile hot huge humble
humid hungry icy identical idle ill illegal imaginary immense immune important impossible industrial
infinite innocent intense interior internal invisible irregular itchy jagged jealous jolly joyful
juicy junior juvenile large late lavish lazy lean legal lethal level light liquid little lively
local lonely long loose loud lovely low loyal lucky lunar luxurious mad magic magical magnetic major
male marine massive mature medical medieval melted messy metallic mighty mild military miniature
minor misty mobile modern moist molten monstrous moral muddy murky muscular mute mysterious naked
narrow nasty native natural naughty nautical naval neat nervous neutral new nice noble noisy normal
northern nuclear numb nutty obedient obscure obvious odd official old olive open optical orderly
organic ornate outdoor oval painful pale parallel past peaceful perfect permanent pink plain plastic
pleasant plump poetic polar polished polite poor popular portable posh powerful precious pretty
primitive private proud public pure purple quick quiet radiant radical ragged rainy rapid rare raw
ready real rectangular red regular relaxed remote retro rich rigid ripe robust rocky romantic rotten
rough round royal rubber rude rural rustic rusty sacred sad safe salty sandy savage scary scenic
scientific secret serene serious shallow shaggy sharp shiny short shy sick silent silky silly silver
simple sincere skinny sleek sleepy slender slim slimy slippery slow small smart smoky smooth snowy
soft soggy solar solid sore sour southern spacious sparkling spicy spiky spiral splendid spooky sporty
square stale steady steep sticky stiff still stormy straight strange strict striped strong stupid
sturdy subtle sudden sunny super superb supreme sweaty sweet swift symmetric tall tame tan tasty
tender tense terrible thick thin thirsty tidy tight tiny tired toxic tragic transparent tropical
twisted typical ugly ultimate unique unusual upset urban urgent useful vacant vague valid vast
velvet vertical vibrant vicious vintage violent virtual visible vital vivid volcanic warm wavy weak
wealthy weary weird western wet white whole wicked wide wild windy wise wobbly wooden woolly worried
wrinkled wrong yellow young youthful zealous
"""


def bpe_words() -> set[str]:
    """Whole words (merges ending in ``</w>``) of CLIP's BPE vocabulary, as open_clip builds it."""
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    words = set()
    for merge in merges:
        a, b = merge.split()
        if b.endswith("</w>"):
            words.add((a + b)[: -len("</w>")])
    return words


def main() -> None:
    lemma_file = Path(timm.__file__).parent / "data" / "_info" / "imagenet_synset_to_lemma.txt"
    vocab = bpe_words()
    nouns = set()
    for line in lemma_file.read_text().splitlines():
        _, lemmas = line.split("\t", 1)
        for lemma in (p.strip() for p in lemmas.split(",")):
            if re.fullmatch(r"[a-z]{3,14}", lemma) and lemma in vocab:
                nouns.add(lemma)
    adjectives = sorted(set(ADJECTIVES.split()) - nouns)
    header = [
        "# NegLabel candidate labels (robustft default pool): one 'word<TAB>kind' per line, kind noun|adj.",
        "# Generated offline by tools/make_neglabel_candidates.py; see its docstring.",
        f"# nouns ({len(nouns)}): lemmas of the WordNet noun synsets of ImageNet-21k as shipped in timm",
        "#   (timm/data/_info/imagenet_synset_to_lemma.txt; WordNet 3.0 licence, Princeton University),",
        "#   lowercase single words of 3-14 letters that are whole words of CLIP's BPE vocabulary.",
        f"# adjectives ({len(adjectives)}): a hand-written list of common descriptive adjectives (robustft).",
    ]
    lines = [f"{w}\tnoun" for w in sorted(nouns)] + [f"{w}\tadj" for w in adjectives]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(header + lines) + "\n")
    print(f"wrote {OUT}: {len(nouns)} nouns, {len(adjectives)} adjectives")


if __name__ == "__main__":
    main()

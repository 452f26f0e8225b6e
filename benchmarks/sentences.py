"""A fixed set of real English sentences in topical groups, for sentence-embedding fidelity benchmarks.

CALIBRATION and EVALUATION do not overlap.
"""
import sys
from pathlib import Path

TOPICS = {
    "weather": [
        "It rained all night and the streets are still flooded this morning.",
        "The forecast says a cold front will bring snow by the weekend.",
        "A heat wave pushed temperatures above forty degrees in the south.",
        "Strong winds knocked down power lines across the valley.",
        "The fog was so thick that the ferry service was cancelled.",
        "After weeks of drought, farmers finally welcomed a steady rain.",
        "Thunderstorms are expected to roll in late this afternoon.",
        "The sky cleared up just in time for the evening fireworks.",
    ],
    "cooking": [
        "Simmer the tomatoes with garlic and basil for twenty minutes.",
        "She kneaded the dough until it was smooth and elastic.",
        "Roast the vegetables at high heat so they caramelize at the edges.",
        "He added a pinch of salt to bring out the sweetness of the sauce.",
        "The soup tastes better the next day once the flavors have blended.",
        "Whisk the eggs and sugar until the mixture turns pale.",
        "Let the steak rest for a few minutes before slicing it.",
        "Fresh herbs should go in at the very end of cooking.",
    ],
    "sports": [
        "The striker scored twice in the final ten minutes of the match.",
        "Our team lost the championship game by a single point.",
        "She broke the national record in the four hundred meter sprint.",
        "The coach called a timeout to calm his nervous players.",
        "Thousands of fans filled the stadium despite the heavy rain.",
        "The tennis final went to five sets and lasted almost five hours.",
        "He trained every morning for a year to run the marathon.",
        "The referee's decision sparked angry protests from the crowd.",
    ],
    "computers": [
        "The laptop overheats whenever I run the video editing software.",
        "Restarting the router fixed the slow internet connection.",
        "The new compiler release makes the build twice as fast.",
        "A memory leak caused the server to crash every few hours.",
        "She wrote a script to back up the database every night.",
        "The graphics card struggles with the latest games at high settings.",
        "Updating the operating system removed several security holes.",
        "The program runs much faster after we rewrote the inner loop.",
    ],
    "finance": [
        "The central bank raised interest rates for the third time this year.",
        "Stock prices fell sharply after the disappointing earnings report.",
        "He saves a fixed part of his salary every month for retirement.",
        "Inflation has made groceries noticeably more expensive.",
        "The company borrowed heavily to finance its expansion overseas.",
        "Investors moved their money into bonds as markets turned volatile.",
        "The startup raised ten million dollars in its latest funding round.",
        "Mortgage payments have become a burden for many young families.",
    ],
    "animals": [
        "The cat slept in a patch of sunlight on the kitchen floor.",
        "A family of ducks crossed the road and stopped all the traffic.",
        "Our dog barks at every delivery truck that passes the house.",
        "Elephants can remember the location of water holes for decades.",
        "The owl hunted silently over the field at dusk.",
        "A stray kitten followed the children all the way home.",
        "Bees are essential for pollinating many of the crops we eat.",
        "The horse refused to jump over the last fence.",
    ],
    "travel": [
        "Our flight was delayed for six hours because of a technical problem.",
        "We took the night train across the mountains to the coast.",
        "The old town is best explored on foot early in the morning.",
        "She lost her passport on the first day of the trip.",
        "The hotel overlooked a quiet harbor full of fishing boats.",
        "Backpacking through the islands was cheaper than we expected.",
        "The museum was closed, so we wandered through the market instead.",
        "Renting a car gave us the freedom to visit remote villages.",
    ],
    "health": [
        "Regular exercise lowers the risk of heart disease.",
        "The doctor recommended more sleep and less coffee.",
        "He sprained his ankle while hiking down the steep trail.",
        "Drinking enough water helps you concentrate during the day.",
        "The clinic offers free flu vaccinations every autumn.",
        "Stress can make it hard to fall asleep at night.",
        "She recovered quickly after the minor surgery on her knee.",
        "A balanced diet includes plenty of fruit and vegetables.",
    ],
}

ALL = [s for group in TOPICS.values() for s in group]
CALIBRATION = [s for group in TOPICS.values() for s in group[:3]]  # 24 sentences
EVALUATION = [s for group in TOPICS.values() for s in group[3:]]  # 40 sentences



sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from text import prose  # noqa: E402,F401  (documentation sentences; shared with examples/smollm2.py)

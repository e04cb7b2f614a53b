#!/usr/bin/python3
# N clients at once, each writing its own region in random-sized pieces and verifying
# every byte. Usage: many_clients.py URI N
import os
import random
import sys
import threading
import nbd

uri = sys.argv[1]
count = int(sys.argv[2])
region = 1 << 20
errors = []


def client(index):
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        rng = random.Random(index)
        base = index * region
        image = bytearray(region)
        for _ in range(40):
            length = rng.choice([512, 4096, 65536, 3000, 100])
            offset = rng.randrange(0, region - length)
            data = os.urandom(length)
            h.pwrite(data, base + offset)
            image[offset:offset + length] = data
        if rng.random() < 0.5:
            h.flush()
        if h.pread(region, base) != bytes(image):
            errors.append(f"client {index}: read back differs")
        h.shutdown()
    except Exception as e:  # noqa: BLE001 - report every failure
        errors.append(f"client {index}: {e}")


threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if errors:
    print(*errors, sep="\n")
    sys.exit(1)
print("ok")

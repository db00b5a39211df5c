/**
 * Turns QEMU's complaint about an incoming stream into the likely cause, in words an operator
 * can act on. QEMU's own message is always kept; this only adds a hint.
 */
const RULES: Array<[RegExp, (m: RegExpMatchArray) => string]> = [
  [
    /Unknown ramblock "([^"]+)"/,
    (m) =>
      `the snapshot has RAM block "${m[1]}" that this VM lacks: it was captured with a device or ROM ` +
      '(e.g. a NIC boot ROM, a different -kernel) that the base spec does not have',
  ],
  [
    /Length mismatch: ([^:]+): (0x[0-9a-f]+) in != (0x[0-9a-f]+)/i,
    (m) => `RAM block ${m[1]} has another size here (${m[2]} vs ${m[3]}): different -m, ROM or QEMU version`,
  ],
  [
    /Machine type received is '([^']*)' and local is '([^']*)'/,
    (m) => `the snapshot is from machine ${m[1]}, this VM is ${m[2]}`,
  ],
  [
    /Unknown savevm section or instance '([^']+)'/,
    (m) => `the snapshot has device "${m[1]}" that this VM lacks: the device set differs from the base's`,
  ],
  [
    /error while loading state for instance 0x\w+ of device '([^']+)'/,
    (m) => `device "${m[1]}" differs between the snapshot and this VM`,
  ],
  [
    /backing store size (0x[0-9a-f]+) does not match 'size' option (0x[0-9a-f]+)/,
    (m) =>
      `the base RAM file holds ${Number(m[1]) / 2 ** 20} MiB but the VM spec asks for ` +
      `${Number(m[2]) / 2 ** 20} MiB: the spec does not match the snapshot`,
  ],
  [/Could not open '([^']+)': Permission denied/, (m) => `QEMU cannot open ${m[1]}: check file permissions`],
  [
    /ram_block_discard|Failed to set up memory-backend/i,
    () => 'the RAM file could not be mapped: check that the base RAM file exists and matches -m',
  ],
];

export function diagnoseQemu(stderr: string): string | undefined {
  for (const [re, hint] of RULES) {
    const m = stderr.match(re);
    if (m) return hint(m);
  }
  return undefined;
}

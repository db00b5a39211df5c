/**
 * Signed overlays and base packages (issue 9, part 1): key generation, signing, verification
 * through the CLI with --trust and the trust store; an unsigned or wrongly signed overlay is
 * refused (exit 13) before anything is written; one flipped byte anywhere of a signed overlay is
 * refused, also when the attacker re-seals every unkeyed checksum; `info` shows who signed.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, readFile, readdir, rm, stat, writeFile, copyFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { createServer } from 'node:http';
import { join } from 'node:path';
import { BIN, cli } from '../helpers/cli.js';
import { createTiny, importTiny, makeTinyVm, type TinyVm } from '../helpers/tiny-vm.js';
import { xorByte } from '../helpers/bytes.js';
import { OverlayReader } from '../../src/overlay/reader.js';
import { headerDigest } from '../../src/overlay/signature.js';
import { parseHeader } from '../../src/overlay/validate.js';
import { FOOTER_SIZE, HEADER_FIXED } from '../../src/overlay/format.js';
import { CloudletError, CorruptInputError, UntrustedError } from '../../src/util/errors.js';
import { loadPublicKey } from '../../src/util/sign.js';
import { readRecord } from '../../src/delta/record.js';
import { ByteReader } from '../../src/delta/varint.js';

let dir: string;
let env: NodeJS.ProcessEnv;
let tiny: TinyVm;
let signed: string;
let unsigned: string;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'clo-trust-'));
  env = { ...process.env, CLOUDLET_LIBRARY: join(dir, 'lib'), XDG_CONFIG_HOME: join(dir, 'config') };
  tiny = await makeTinyVm(join(dir, 'vm'));
  await importTiny(tiny, env);
  for (const name of ['alice', 'mallory']) {
    const g = await cli(['key', 'generate', join(dir, name)], env);
    assert.equal(g.code, 0, g.stderr);
  }
  signed = join(dir, 'signed.overlay');
  unsigned = join(dir, 'unsigned.overlay');
  await createTiny(tiny, env, signed, ['--sign', join(dir, 'alice.key')]);
  await createTiny(tiny, env, unsigned);
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

test('key generate: a 0600 private key and a public key; existing files refused unless --force', async () => {
  const st = await stat(join(dir, 'alice.key'));
  assert.equal(st.mode & 0o777, 0o600, 'private key mode');
  const pub = await loadPublicKey(join(dir, 'alice.pub'));
  assert.match(pub.keyId, /^[0-9a-f]{64}$/);
  const again = await cli(['key', 'generate', join(dir, 'alice')], env);
  assert.equal(again.code, 10, again.stderr);
  assert.equal(again.json.exit_code, 10);
  const before = await readFile(join(dir, 'alice.key'));
  assert.ok(before.equals(await readFile(join(dir, 'alice.key'))), 'the existing key is untouched');
  const trustPriv = await cli(['verify', signed, '--trust', join(dir, 'alice.key')], env);
  assert.equal(trustPriv.code, 2, 'a private key is not a trusted key');
});

test('a signed overlay verifies with the signer trusted; info shows who signed', async () => {
  const v = await cli(['verify', signed, '--trust', join(dir, 'alice.pub')], env);
  assert.equal(v.code, 0, v.stderr);
  assert.equal((v.json.signature as { status: string }).status, 'verified');
  const info = await cli(['info', signed, '--trust', join(dir, 'alice.pub')], env);
  assert.equal(info.code, 0, info.stderr);
  const sig = info.json.signature as { status: string; signer: string; key_id: string; trusted_as: string };
  assert.equal(sig.status, 'verified');
  assert.equal(sig.signer, 'alice');
  assert.equal(sig.key_id, (await loadPublicKey(join(dir, 'alice.pub'))).keyId);
  assert.equal(info.json.format_version, '1.1');
  // Without a trusted key nothing is refused, and info still names the key.
  const plain = await cli(['info', signed], env);
  assert.equal((plain.json.signature as { status: string }).status, 'unverified');
  const human = execFileSync(process.execPath, [BIN, 'info', signed, '--trust', join(dir, 'alice.pub')], {
    env,
    encoding: 'utf8',
  });
  assert.match(human, /signed by key [0-9a-f]{16} \("alice"\): verified with trusted key alice/);
});

test('unsigned, foreign-signed: refused with exit 13 before anything is written', async () => {
  const out = join(dir, 'out-refused');
  const base = ['--base', 'tiny', '-o', out];
  const r1 = await cli(['apply', unsigned, ...base, '--trust', join(dir, 'alice.pub')], env);
  assert.equal(r1.code, 13, r1.stderr);
  assert.equal(r1.json.exit_code, 13);
  assert.equal(r1.json.code, 'UntrustedError');
  assert.match(r1.stderr, /not signed/);
  const r2 = await cli(['apply', signed, ...base, '--trust', join(dir, 'mallory.pub')], env);
  assert.equal(r2.code, 13, r2.stderr);
  assert.match(r2.stderr, /not trusted/);
  assert.equal(await stat(out).catch(() => undefined), undefined, 'no output directory');
  // From a URL (the streaming reader checks the signature as soon as the header arrived).
  const server = createServer((req, res) => {
    void readFile(req.url === '/signed' ? signed : unsigned).then((b) => res.end(b));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  try {
    const url = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
    const r5 = await cli(['apply', `${url}/unsigned`, ...base, '--trust', join(dir, 'alice.pub')], env);
    assert.equal(r5.code, 13, r5.stderr);
    const r6 = await cli(['apply', `${url}/signed`, '--base', 'tiny', '-o', join(dir, 'out-url')], env);
    assert.equal(r6.code, 0, r6.stderr);
  } finally {
    server.close();
  }
  assert.equal(await stat(out).catch(() => undefined), undefined, 'no output directory');
  // The trust store directory counts like --trust.
  const store = join(dir, 'config', 'cloudlet-overlay', 'trusted');
  await mkdir(store, { recursive: true });
  await copyFile(join(dir, 'alice.pub'), join(store, 'alice.pub'));
  try {
    const r3 = await cli(['verify', unsigned], env);
    assert.equal(r3.code, 13, r3.stderr);
    const r4 = await cli(['apply', signed, ...base], env);
    assert.equal(r4.code, 0, r4.stderr);
  } finally {
    await rm(store, { recursive: true, force: true });
  }
});

/** Opens, reads every record, as a reader would; throws what a reader throws. */
async function readAll(path: string, trust: Awaited<ReturnType<typeof loadPublicKey>>[]): Promise<void> {
  const r = await OverlayReader.open(path, { trust });
  try {
    for (let n = 0; n < r.index.segments.length; n++) {
      const rd = new ByteReader(await r.get(n), `segment ${n}`);
      while (rd.remaining > 0) readRecord(rd);
    }
  } finally {
    await r.close();
  }
}

test('one flipped byte anywhere of a signed overlay is refused', async () => {
  const good = await readFile(signed);
  const alice = [await loadPublicKey(join(dir, 'alice.pub'))];
  await readAll(signed, alice);
  const file = join(dir, 'flip.overlay');
  // Every byte of a small overlay (a few KiB): each flip must be refused.
  const step = good.length > 40_000 ? Math.ceil(good.length / 40_000) : 1;
  let refused = 0;
  for (let at = 0; at < good.length; at += step) {
    const b = Buffer.from(good);
    xorByte(b, at, 0x01);
    await writeFile(file, b);
    try {
      await readAll(file, alice);
      assert.fail(`flipping byte ${at} was not noticed`);
    } catch (err) {
      if (!(err instanceof CloudletError)) throw err;
      refused++;
    }
  }
  assert.ok(refused > 0);
});

/** sha256 of bytes, as Buffer. */
const sha = (b: Buffer): Buffer => createHash('sha256').update(b).digest();

test('re-sealed tampering (every unkeyed checksum recomputed) is refused by the signature', async () => {
  const good = await readFile(signed);
  const alice = [await loadPublicKey(join(dir, 'alice.pub'))];
  const jsonLen = good.readUInt32LE(12);
  const json = Buffer.from(good.subarray(HEADER_FIXED, HEADER_FIXED + jsonLen));
  // Change the creator string (same length), then fix the header checksum and the footer's header hash.
  const text = json.toString('latin1');
  const at = text.indexOf('"creator":"') + '"creator":"'.length;
  json[at] = json[at] === 0x78 ? 0x79 : 0x78;
  const tampered = Buffer.from(good);
  json.copy(tampered, HEADER_FIXED);
  sha(tampered.subarray(0, HEADER_FIXED + jsonLen)).copy(tampered, HEADER_FIXED + jsonLen);
  sha(tampered.subarray(0, HEADER_FIXED + jsonLen + 32)).copy(tampered, tampered.length - FOOTER_SIZE + 32);
  const file = join(dir, 'resealed.overlay');
  await writeFile(file, tampered);
  await assert.rejects(readAll(file, alice), UntrustedError, 'a re-sealed header edit fails the signature');
  await readAll(file, []); // without trust the edit is only a changed (unsigned) field: it opens
  // The header digest the signature covers changed; the one of the original did not.
  const h = parseHeader(json);
  assert.ok(h.signature);
  assert.ok(!headerDigest(json).equals(headerDigest(good.subarray(HEADER_FIXED, HEADER_FIXED + jsonLen))));

  // A segment edited with its own checksums fixed (frame header and index sha256): the index
  // no longer matches the header's index_sha256 (corrupt); fixing that too breaks the signature.
  const r = await OverlayReader.open(signed);
  const seg = r.index.segments[0]!;
  const indexOffset = r.indexOffset;
  await r.close();
  assert.ok(seg, 'the overlay has a segment');
  const t2 = Buffer.from(good);
  const frameAt = seg.offset + 48;
  xorByte(t2, frameAt + Math.floor(seg.length / 2), 0x20);
  const newSha = sha(t2.subarray(frameAt, frameAt + seg.length));
  newSha.copy(t2, seg.offset + 16);
  // The index is a zstd frame of JSON: rebuild it with the new sha256.
  const { decompress, compress } = await import('../../src/delta/zstd.js');
  const head = t2.subarray(indexOffset, indexOffset + 48);
  const compLen = head.readUInt32LE(4);
  const rawLen = head.readUInt32LE(8);
  const idx = JSON.parse(
    decompress(t2.subarray(indexOffset + 48, indexOffset + 48 + compLen), rawLen, 'i').toString(),
  ) as {
    segments: Array<{ sha256: string }>;
  };
  idx.segments[0]!.sha256 = newSha.toString('hex');
  const rawIdx = Buffer.from(JSON.stringify(idx));
  const frame = compress(rawIdx, 19);
  const newHead = Buffer.alloc(48);
  head.copy(newHead, 0, 0, 4);
  newHead.writeUInt32LE(frame.length, 4);
  newHead.writeUInt32LE(rawIdx.length, 8);
  sha(frame).copy(newHead, 16);
  const footer = Buffer.from(t2.subarray(t2.length - FOOTER_SIZE));
  footer.writeBigUInt64LE(BigInt(48 + frame.length), 16);
  const rebuilt = Buffer.concat([t2.subarray(0, indexOffset), newHead, frame, footer]);
  await writeFile(file, rebuilt);
  await assert.rejects(readAll(file, alice), CorruptInputError, "the index does not match the header's index_sha256");
  await assert.rejects(readAll(file, []), CorruptInputError, 'index_sha256 protects unsigned overlays too');
  // And with index_sha256 patched in the header as well (plus both header checksums): the signature fails.
  const j2 = Buffer.from(rebuilt.subarray(HEADER_FIXED, HEADER_FIXED + jsonLen));
  const jt = j2.toString('latin1');
  const ia = jt.indexOf('"index_sha256":"') + '"index_sha256":"'.length;
  j2.write(sha(Buffer.concat([newHead, frame])).toString('hex'), ia, 'latin1');
  j2.copy(rebuilt, HEADER_FIXED);
  sha(rebuilt.subarray(0, HEADER_FIXED + jsonLen)).copy(rebuilt, HEADER_FIXED + jsonLen);
  sha(rebuilt.subarray(0, HEADER_FIXED + jsonLen + 32)).copy(rebuilt, rebuilt.length - FOOTER_SIZE + 32);
  await writeFile(file, rebuilt);
  await assert.rejects(readAll(file, alice), UntrustedError);
});

test('a 1.x reader ignores header fields it does not know (1.1 fields are optional to 1.0)', () => {
  const h = {
    format: 'cloudlet-overlay',
    version: [1, 7],
    createdAt: 'x',
    creator: 'y',
    chunkSize: 4096,
    base: { id: '0'.repeat(64), targets: [] },
    targets: [],
    compression: { codec: 'zstd', level: 3 },
    some_future_field: { anything: [1, 2, 3] },
  };
  const parsed = parseHeader(Buffer.from(JSON.stringify(h)));
  assert.deepEqual(parsed.version, [1, 7]);
  assert.equal('some_future_field' in parsed, false);
});

test('base packages: signed export verifies on import; unsigned or tampered ones are refused', async () => {
  const pkg = join(dir, 'tiny.tar');
  const e = await cli(['base', 'export', 'tiny', '-o', pkg, '--sign', join(dir, 'alice.key')], env);
  assert.equal(e.code, 0, e.stderr);
  const again = await cli(['base', 'export', 'tiny', '-o', pkg], env);
  assert.equal(again.code, 10, 'an existing package is not overwritten without --force');
  const env2 = { ...env, CLOUDLET_LIBRARY: join(dir, 'lib2') };
  const ok = await cli(['base', 'import', pkg, '--trust', join(dir, 'alice.pub')], env2);
  assert.equal(ok.code, 0, ok.stderr);
  assert.equal((ok.json.signature as { status: string }).status, 'verified');
  const wrongKey = await cli(['base', 'import', pkg, '--trust', join(dir, 'mallory.pub')], {
    ...env,
    CLOUDLET_LIBRARY: join(dir, 'lib3'),
  });
  assert.equal(wrongKey.code, 13, wrongKey.stderr);

  const plain = join(dir, 'plain.tar');
  const id = String(ok.json.id);
  // An unsigned package: the library's copy without its signature.
  const work = join(dir, 'unpacked');
  await mkdir(work);
  execFileSync('tar', ['-xf', pkg, '-C', work]);
  await rm(join(work, id, 'signature.json'));
  execFileSync('tar', ['--sparse', '-cf', plain, '-C', work, id]);
  const unsignedImport = await cli(['base', 'import', plain, '--trust', join(dir, 'alice.pub')], {
    ...env,
    CLOUDLET_LIBRARY: join(dir, 'lib4'),
  });
  assert.equal(unsignedImport.code, 13, unsignedImport.stderr);

  // Any change to the manifest (here: its name, and the VM spec's append) of the signed package.
  execFileSync('tar', ['-xf', pkg, '-C', work]);
  const manifestPath = join(work, id, 'manifest.json');
  const original = await readFile(manifestPath, 'utf8');
  for (const edit of [
    (s: string) => s.replace('"name": "tiny"', '"name": "tinz"'),
    (s: string) => s.replace('console=ttyS0', 'console=ttyS1'),
  ]) {
    await writeFile(manifestPath, edit(original));
    const bad = join(dir, 'bad.tar');
    execFileSync('tar', ['--sparse', '-cf', bad, '-C', work, id]);
    const lib = join(dir, `lib-bad-${Math.random().toString(36).slice(2)}`);
    const signedBad = await cli(['base', 'import', bad, '--trust', join(dir, 'alice.pub')], {
      ...env,
      CLOUDLET_LIBRARY: lib,
    });
    assert.equal(signedBad.code, 13, `signed, edited: refused by the signature: ${signedBad.stderr}`);
    assert.deepEqual(await readdir(join(lib, 'bases')).catch(() => []), [], 'nothing imported');
  }
  // Unsigned and edited: the spec change is refused by the id (it covers the spec).
  await rm(join(work, id, 'signature.json'));
  await writeFile(manifestPath, original.replace('console=ttyS0', 'console=ttyS1'));
  const bad = join(dir, 'bad2.tar');
  execFileSync('tar', ['--sparse', '-cf', bad, '-C', work, id]);
  const r = await cli(['base', 'import', bad], { ...env, CLOUDLET_LIBRARY: join(dir, 'lib5') });
  assert.equal(r.code, 4, r.stderr);
  assert.match(r.stderr, /id does not cover/);
});

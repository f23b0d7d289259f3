// SmolChat.swift: greedy generation with a `smolexport coreml` export, Core ML only (macOS 15+ / iOS 18+,
// Apple silicon: Swift's Float16 is not available on Intel Macs). See docs/coreml.md.
//
//   swift run -c release SmolChat exports/smollm2-135m-coreml-int4 "What is the capital of France?" [MAX_NEW_TOKENS]
//
// Build it as an executable target depending on swift-transformers' "Transformers" product, in the Swift 5
// language mode (swift-tools-version 5.9 / 5.10). It is kept short and has no concurrency annotations; in the
// Swift 6 mode, expect sendability diagnostics and isolate SmolModel to an actor.
//
// The program (model.mlpackage): inputs `input_ids` int32 [1, S] and `causal_mask` fp16 [1, 1, S, P+S]
// (0 = may attend, -inf = may not; P = tokens already cached, read from the mask's width); states
// `key_cache` / `value_cache`, updated in place by every prediction; output `logits` fp16 [1, 1, vocab] for the
// last new token. Token ids come from swift-transformers (module Tokenizers), which reads tokenizer.json and
// tokenizer_config.json from the export folder; any tokenizer that produces the same ids will do.

import CoreML
import Foundation
import Tokenizers

enum SmolChatError: Error {
    case missingLogits
    case promptTooLong(tokens: Int, context: Int)
}

/// A loaded program and its KV cache: one MLState per conversation.
final class SmolModel {
    let model: MLModel
    private(set) var state: MLState
    private(set) var cached = 0  // tokens in the state

    init(package: URL, computeUnits: MLComputeUnits = .all) async throws {
        // Compiling a large model takes a while: an app does it once and keeps the .mlmodelc (or adds the
        // .mlpackage to its Xcode target, which compiles it at build time and bundles the .mlmodelc).
        let compiled = try await MLModel.compileModel(at: package)
        let configuration = MLModelConfiguration()
        configuration.computeUnits = computeUnits
        let model = try MLModel(contentsOf: compiled, configuration: configuration)
        self.model = model
        state = model.makeState()  // zeroed key_cache and value_cache
    }

    /// A new conversation: a fresh, zeroed cache.
    func reset() {
        state = model.makeState()
        cached = 0
    }

    /// Feeds `ids` after the cached tokens and returns the logits that follow the last of them.
    func predict(_ ids: [Int]) async throws -> [Float] {
        let s = ids.count, total = cached + s
        var mask = [Float16](repeating: -.infinity, count: s * total)
        for row in 0..<s {
            for column in 0...(cached + row) { mask[row * total + column] = 0 }  // the past and itself
        }
        let inputs = try MLDictionaryFeatureProvider(dictionary: [
            "input_ids": MLFeatureValue(multiArray: MLMultiArray(MLShapedArray<Int32>(
                scalars: ids.map { Int32($0) }, shape: [1, s]))),
            "causal_mask": MLFeatureValue(multiArray: MLMultiArray(MLShapedArray<Float16>(
                scalars: mask, shape: [1, 1, s, total]))),
        ])
        let output = try await model.prediction(from: inputs, using: state)  // writes the cache at [P, P+S)
        cached = total
        guard let logits = output.featureValue(for: "logits")?.multiArrayValue else {
            throw SmolChatError.missingLogits
        }
        return MLShapedArray<Float>(converting: logits).scalars
    }
}

func argmax(_ values: [Float]) -> Int {
    values.indices.max { values[$0] < values[$1] }!
}

func readJSON(_ url: URL) throws -> [String: Any] {
    try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as? [String: Any] ?? [:]
}

@main
struct SmolChat {
    static func main() async throws {
        let arguments = CommandLine.arguments
        guard arguments.count >= 3 else {
            print("usage: SmolChat EXPORT_DIR PROMPT [MAX_NEW_TOKENS]")
            return
        }
        let folder = URL(fileURLWithPath: arguments[1])
        let maxNewTokens = arguments.count > 3 ? Int(arguments[3]) ?? 128 : 128

        // Prompt ids through the chat template (chat_template.jinja when the export has one).
        let tokenizer = try await AutoTokenizer.from(modelFolder: folder)
        let messages = [["role": "user", "content": arguments[2]]]
        let templateFile = folder.appendingPathComponent("chat_template.jinja")
        let promptIds: [Int]
        if let template = try? String(contentsOf: templateFile, encoding: .utf8) {
            promptIds = try tokenizer.applyChatTemplate(messages: messages, chatTemplate: template)
        } else {
            promptIds = try tokenizer.applyChatTemplate(messages: messages)
        }
        // Stop ids: generation_config.json's eos_token_id (a number or a list) and the tokenizer's eos token.
        let eosValue = try readJSON(folder.appendingPathComponent("generation_config.json"))["eos_token_id"]
        var eos = Set((eosValue as? [Int]) ?? [])
        if let id = eosValue as? Int { eos.insert(id) }
        if let id = tokenizer.eosTokenId { eos.insert(id) }
        let manifest = try readJSON(folder.appendingPathComponent("smolexport.json"))
        let context = (manifest["model"] as? [String: Any])?["context_length"] as? Int ?? 2048
        guard promptIds.count < context else {
            throw SmolChatError.promptTooLong(tokens: promptIds.count, context: context)
        }

        let llm = try await SmolModel(package: folder.appendingPathComponent("model.mlpackage"))
        _ = try await llm.predict([promptIds[0]])  // warm-up: the first prediction after loading is slow
        llm.reset()
        let prefillStart = Date()
        var next = try await argmax(llm.predict(promptIds))  // prefill: the whole prompt in one call
        let prefillSeconds = Date().timeIntervalSince(prefillStart)

        var generated: [Int] = []
        var printed = ""
        var steps = 0, decodeSeconds = 0.0
        while !eos.contains(next), generated.count < maxNewTokens {
            generated.append(next)
            let text = tokenizer.decode(tokens: generated)  // decode all, print what is new
            if text.hasPrefix(printed) {
                FileHandle.standardOutput.write(Data(text.dropFirst(printed.count).utf8))
                printed = text
            }
            guard generated.count < maxNewTokens, llm.cached < context else { break }
            let start = Date()
            next = try await argmax(llm.predict([next]))  // decode: one token, the cache grows in place
            decodeSeconds += Date().timeIntervalSince(start)
            steps += 1
        }
        print(String(format: "\n\n%d prompt tokens in %.0f ms; %d tokens at %.1f tokens/s (decode)",
                     promptIds.count, prefillSeconds * 1000, generated.count,
                     decodeSeconds > 0 ? Double(steps) / decodeSeconds : 0))
    }
}
